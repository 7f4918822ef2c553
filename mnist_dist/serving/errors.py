"""A request the server cannot take: the client's mistake, answered with a 4xx status and one line."""


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
