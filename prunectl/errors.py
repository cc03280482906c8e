"""The one exception type a user ever sees: what is wrong and what to do, one line per problem."""


class PrunectlError(Exception):
    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
