"""The start-up advice to preload tcmalloc on CPU (`utils/process.tcmalloc_hint`)."""

from __future__ import annotations

from tokenmill.utils.process import loaded_tcmalloc, tcmalloc_hint


def test_advises_an_installed_tcmalloc_only_where_it_is_not_loaded(tmp_path):
    plain = tmp_path / "maps"
    plain.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    preloaded = tmp_path / "maps_tcmalloc"
    preloaded.write_text(plain.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4\n")
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")

    assert not loaded_tcmalloc(str(plain)) and loaded_tcmalloc(str(preloaded))
    hint = tcmalloc_hint(str(plain), (str(tmp_path / "missing.so"), str(library)))
    assert hint is not None and f"LD_PRELOAD={library}" in hint
    assert tcmalloc_hint(str(preloaded), (str(library),)) is None  # already in use
    assert tcmalloc_hint(str(plain), (str(tmp_path / "missing.so"),)) is None  # nothing to suggest
