"""Command-line interface (`partial-fc ...`)."""
