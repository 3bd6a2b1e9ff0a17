from tests.test_train import faceset  # noqa: F401 - the tiny generated face set every end-to-end job trains on
