"""The error of one bad record: a short reason code (for counts in the report) and a message."""


class RecordError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
