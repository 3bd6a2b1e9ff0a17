"""Running `partial-fc` subcommands in-process from tests and checking their one-line errors."""

from partial_fc.cli.main import main


def call(capsys, *arguments: str) -> tuple[int, str, str]:
    """The command's entry point in this process: (status, stdout, stderr)."""
    status = main(list(arguments))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error(status: int, err: str, *names: str) -> None:
    """Exit status 2, one `partial-fc: error:` line naming everything in `names`, no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("partial-fc: error:")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in errors[0], (name, errors[0])
