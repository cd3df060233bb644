"""k-means for CATT dictionaries, and the dictionary file: blobs recovered, inertia monotone, seeded,
chunking invisible, empty clusters re-seeded, files round-trip and wrong files refused in one line."""
from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

from xattn_cli.dictionary import (
    DictionaryFile,
    kmeans,
    kmeans_plus_plus,
    lloyd,
    load_dictionary,
    nearest_points,
    region_crop,
    save_dictionary,
)
from xattn_cli.errors import UsageError


def _blobs(seed: int = 0, per_blob: int = 400, sigma: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 Gaussian blobs in 16-D, centres ≥ 1 apart: (2000, 16) points, (5, 16) centres, (2000,) true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=g, dtype=torch.float64) * 2
    assert float(torch.pdist(centres).min()) >= 1
    labels = torch.arange(5).repeat_interleave(per_blob)
    points = centres[labels] + sigma * torch.randn(len(labels), 16, generator=g, dtype=torch.float64)
    order = torch.randperm(len(labels), generator=g)
    return points[order], centres, labels[order]


def _matching(found: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """For each true centre, the found centroid of the best one-to-one matching (brute force over 5!)."""
    distances = torch.cdist(truth, found)
    return list(min(itertools.permutations(range(len(found))),
                    key=lambda p: float(sum(distances[i, j] for i, j in enumerate(p)))))


def test_gaussian_blobs_are_recovered():
    points, centres, labels = _blobs()
    result = kmeans(points, 5, seed=0)
    match = _matching(result.centroids, centres)
    # the best achievable centroid is each blob's sample mean: within σ/√400 · √16 ≈ 0.01 of the centre
    sample_means = torch.stack([points[labels == i].mean(0) for i in range(5)])
    torch.testing.assert_close(result.centroids[match], sample_means, atol=1e-9, rtol=0)
    assert float((result.centroids[match] - centres).norm(dim=1).max()) < 0.01 * 16 ** 0.5
    assert float((result.centroids[match] - centres).abs().max()) < 0.01
    relabel = torch.empty(5, dtype=torch.long)
    relabel[torch.tensor(match)] = torch.arange(5)
    assert torch.equal(relabel[result.labels], labels)
    assert result.converged and result.counts.tolist() == [400] * 5


def test_inertia_never_rises_and_the_same_seed_gives_the_same_centroids():
    g = torch.Generator().manual_seed(3)
    points = torch.rand(3000, 8, generator=g)  # no cluster structure: many Lloyd steps
    first, again, other = kmeans(points, 12, seed=1), kmeans(points, 12, seed=1), kmeans(points, 12, seed=2)
    assert len(first.inertias) > 5
    assert all(b <= a * (1 + 1e-12) for a, b in zip(first.inertias, first.inertias[1:]))
    assert first.inertias[-1] < first.inertias[0]
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.centroids, other.centroids)
    # the reported inertia is that of the returned centroids and labels
    assert first.inertia == pytest.approx(float((points.double() - first.centroids[first.labels]).square().sum()))


def test_chunked_distances_equal_unchunked():
    g = torch.Generator().manual_seed(4)
    points = torch.rand(1000, 6, generator=g, dtype=torch.float64)
    whole, chunked = kmeans(points, 9, seed=0, chunk=1 << 20), kmeans(points, 9, seed=0, chunk=37)
    assert torch.equal(whole.labels, chunked.labels)
    torch.testing.assert_close(whole.centroids, chunked.centroids, atol=1e-12, rtol=0)
    assert whole.inertias == pytest.approx(chunked.inertias, rel=1e-12)
    near_whole, near_chunked = nearest_points(points, whole.centroids, 4), nearest_points(points, whole.centroids, 4, chunk=37)
    assert torch.equal(near_whole, near_chunked)


def test_an_empty_cluster_is_reseeded():
    points, centres, _ = _blobs(seed=1)
    start = centres.clone()
    start[4] = 1e3  # far from every point: empty after the first assignment
    result = lloyd(points, start)
    assert lloyd(points, start, iters=0).counts[4] == 0  # really empty at first
    assert int(result.counts.min()) > 0 and result.converged
    # the re-seeded entry ends on a real blob (one of the others had absorbed blob 4)
    match = _matching(result.centroids, centres)
    assert float((result.centroids[match] - centres).abs().max()) < 0.01


def test_seeding_handles_points_that_already_sit_on_seeds():
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    seeds = kmeans_plus_plus(points, 3, torch.Generator().manual_seed(0))
    assert seeds.shape == (3, 2) and {tuple(s) for s in seeds.tolist()} == {(0.0, 0.0), (1.0, 1.0)}
    with pytest.raises(UsageError, match="k=4 for 3 points"):
        kmeans(points, 4, seed=0)


def test_nearest_points_are_the_nearest():
    g = torch.Generator().manual_seed(5)
    points, centroids = torch.rand(200, 3, generator=g), torch.rand(4, 3, generator=g)
    nearest = nearest_points(points, centroids, 5, chunk=16)
    for k in range(4):
        distances = (points - centroids[k]).norm(dim=1)
        assert nearest[k].tolist() == distances.argsort()[:5].tolist()


def _file(k: int = 4, d: int = 6, m: int = 2) -> DictionaryFile:
    g = torch.Generator().manual_seed(6)
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    crops = torch.stack([region_crop(image, (0.0, 0.0, 0.5, 0.25), size=8)] * (k * m)).view(k, m, 8, 8, 3)
    return DictionaryFile(torch.randn(k, d, generator=g), torch.arange(k) + 3, torch.randint(0, 3, (k, m, 2), generator=g),
                          crops, ["images/a.png", "images/b.png", "images/c.png"], {"model": "shapes-x", "seed": "0"})


def test_save_load_round_trip(tmp_path):
    original = _file()
    assert original.crops.dtype == torch.uint8 and original.crops[0, 0, 0, 0].tolist() == [200, 10, 10]
    save_dictionary(tmp_path / "d.safetensors", original)
    loaded = load_dictionary(tmp_path / "d.safetensors", k=4, dim=6)
    for name in ("entries", "counts", "members", "crops"):
        assert torch.equal(getattr(loaded, name), getattr(original, name)), name
    assert loaded.names == original.names and loaded.info == original.info


def test_wrong_files_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_dictionary(good, _file())
    (tmp_path / "text.safetensors").write_text("not a dictionary")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    save_file({"dictionary": torch.zeros(4, 6)}, str(tmp_path / "other.safetensors"), metadata={"format": "weights"})
    bad_rows = _file()
    bad_rows.members[0, 0, 0] = 3  # only 3 names
    cases = {tmp_path / "missing.safetensors": "not found", tmp_path / "text.safetensors": "not a readable",
             truncated: "not a readable", tmp_path / "other.safetensors": "not an xattn-dictionary/1"}
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message) as caught:
            load_dictionary(path)
        assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match=r"holds \(4, 6\) entries, this model needs \(4, 8\)"):
        load_dictionary(good, dim=8)
    with pytest.raises(UsageError, match="index the 3 names"):
        save_dictionary(tmp_path / "bad.safetensors", bad_rows)
    # a file whose tensors disagree is refused on load too
    save_file({"dictionary": torch.zeros(4, 6), "counts": torch.zeros(3, dtype=torch.int64),
               "members": torch.zeros(4, 2, 2, dtype=torch.int64), "member_crops": torch.zeros(4, 2, 8, 8, 3, dtype=torch.uint8)},
              str(tmp_path / "mismatch.safetensors"), metadata={"format": "xattn-dictionary/1", "names": "[\"a\"]"})
    with pytest.raises(UsageError, match=r"counts must be \(4,\) int64"):
        load_dictionary(tmp_path / "mismatch.safetensors")
