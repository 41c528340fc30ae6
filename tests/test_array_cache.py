"""Arrays kept on disk between runs: computed once, recomputed when anything they depend on changes,
never trusted when damaged, and never in the way when the cache cannot be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdcontract.digits import digits_gray
from training.array_cache import cache_key, cached_array
from training.data import _render_client_forms, client_form_pictures, preprocessing
from training.recipe import DataConfig


class Counting:
    def __init__(self, value: np.ndarray):
        self.value, self.calls = value, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.value


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_computed_once_then_read_back(cache: Path) -> None:
    compute = Counting(np.arange(12, dtype=np.uint8).reshape(3, 4))
    first = cached_array("kind", "k1", compute)
    second = cached_array("kind", "k1", compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(first, second)
    assert (cache / "kind" / "k1.npy").is_file()
    assert not list((cache / "kind").glob("*.tmp")), "no temporary file left behind"


def test_a_damaged_file_is_recomputed_and_replaced(cache: Path, capsys: pytest.CaptureFixture) -> None:
    compute = Counting(np.ones((4, 4), dtype=np.float32))
    cached_array("kind", "k", compute)
    path = cache / "kind" / "k.npy"
    path.write_bytes(path.read_bytes()[:20])  # truncated, as after a full disk
    np.testing.assert_array_equal(cached_array("kind", "k", compute), compute.value)
    assert compute.calls == 2
    assert "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(path), compute.value)


def test_off_computes_every_time_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSERVE_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compute = Counting(np.zeros(3))
    cached_array("kind", "k", compute)
    cached_array("kind", "k", compute)
    assert compute.calls == 2
    assert not any(tmp_path.iterdir())


def test_an_unwritable_cache_does_not_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv("KDSERVE_CACHE_DIR", str(blocker))
    compute = Counting(np.full(5, 7))
    np.testing.assert_array_equal(cached_array("kind", "k", compute), compute.value)


def test_keys_are_length_prefixed() -> None:
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key("ab", "c") == cache_key("ab", "c")


def test_client_form_pictures_from_the_cache_are_the_rendered_ones(cache: Path) -> None:
    digits = digits_gray()[0][:6]
    spec = preprocessing(DataConfig(dataset="digits", image_size=8))
    fresh = _render_client_forms(digits, 3, spec, seed=5)
    first = client_form_pictures(digits, 3, spec, seed=5).numpy()
    assert len(list((cache / "client_forms").glob("*.npy"))) == 1
    again = client_form_pictures(digits, 3, spec, seed=5).numpy()
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(again, fresh)
    other_seed = client_form_pictures(digits, 3, spec, seed=6).numpy()
    assert len(list((cache / "client_forms").glob("*.npy"))) == 2, "another seed is another entry"
    assert not np.array_equal(other_seed, fresh)
