import pytest


@pytest.fixture(scope="module")
def fast_tokenizer():
    """Load each tokenizer file once per module (a Tekken file takes seconds); in-process train() calls use it."""
    from pathlib import Path

    from magistune import tokenizer as tk

    real, memo = tk.load_tokenizer, {}

    def cached(path):
        path = Path(path)
        if not path.is_file():
            return real(path)
        key = (str(path.resolve()), tk.file_digest(path))
        if key not in memo:
            memo[key] = real(path)
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("magistune.tokenizer.load_tokenizer", cached)
        mp.setattr("magistune.data.build.load_tokenizer", cached)
        yield
