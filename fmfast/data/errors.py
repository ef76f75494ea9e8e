"""The one error the data layer raises for bad files."""


class DataError(ValueError):
    """A dataset file is missing or malformed. The message starts with the file it is about."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
