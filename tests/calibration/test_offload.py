"""Capped calibration (``max_memory`` + disk offload) equals the uncapped run."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from mergekit_aim.calibration import calibrate, host_memory
from mergekit_aim.calibration.loading import load_base_model


def _settings(dataset):
    return dict(dataset=str(dataset), num_samples=16, seq_len=32, batch_size=4)


def test_capped_calibration_with_offload_equals_uncapped(
    tiny_family, tiny_text_file, tmp_path
):
    base = tiny_family("llama").base
    # Cap below two layers: most of the model goes to disk and is streamed in.
    model = load_base_model(
        str(base), max_memory="64KiB", offload_dir=str(tmp_path / "load")
    )
    assert "disk" in set(model.hf_device_map.values())
    del model

    uncapped = calibrate(str(base), quiet=True, **_settings(tiny_text_file))
    capped = calibrate(
        str(base),
        quiet=True,
        max_memory="64KiB",
        offload_dir=str(tmp_path / "offload"),
        **_settings(tiny_text_file),
    )
    assert set(capped) == set(uncapped) and len(capped) > 0
    for name in uncapped:
        assert torch.equal(capped[name], uncapped[name]), name
        assert capped.count(name) == uncapped.count(name)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_release_mapped_pages_drops_a_touched_mapping(tmp_path):
    path = tmp_path / "blob.bin"
    size = 64 << 20
    path.write_bytes(b"\1" * size)
    with open(path, "rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        try:
            with host_memory.release_mapped_pages([str(path)], interval=0.01):
                total = sum(view[i] for i in range(0, size, mmap.PAGESIZE))
                touched = _rss_file_kib()
                import time

                time.sleep(0.2)
                released = _rss_file_kib()
            assert total == size // mmap.PAGESIZE
            # Contents are intact after the pages were handed back.
            assert view[size - 1] == 1
        finally:
            view.close()
    if host_memory.libc_madvise() is None:
        pytest.skip("no madvise")
    assert released < touched - (32 << 10), (touched, released)


def test_release_mapped_pages_without_files_is_a_no_op():
    with host_memory.release_mapped_pages([]):
        pass
    host_memory.trim_heap()
