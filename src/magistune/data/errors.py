"""The data stage's errors: one bad record (a reason code for the report's counts, and a message), and a
dataset or a whole run that cannot be used."""


class RecordError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class DataError(ValueError):
    """Bad records under on_bad_record: error, or a dataset that cannot be read. The message lists them all."""


def short_error(e: Exception) -> str:
    """An exception from a library as one line of at most 300 characters, for a record's error message."""
    text = (str(e) or type(e).__name__).strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."
