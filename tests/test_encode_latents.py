"""stage=encode_latents on a real local Ray cluster: every prepared row encoded once, the stored posterior
decodes as well as the direct path, statistics that a recomputation confirms, S3 and VQ, kill and resume."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BUCKET, ROOT, kill_midway

from ldm.data.images import normalise, square_crop
from ldm.latents import LatentStats, column_array
from ldm.manifest import verify
from ldm.models.first_stage import build_first_stage, decode, encode, load_first_stage
from ldm.models.presets import first_stage_preset
from ldm.storage import Storage
from ldm.text.tokenizer import load_tokenizer
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.stages.encode_latents import remote as encode_remote
from pipelines.stages.encode_latents.encoder import Encoder

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

DATA = ["experiment=ci", "stage.rows_per_shard=40"]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    """Prepared shards (several files) and a tiny KL first stage saved as a diffusers directory."""
    root = tmp_path_factory.mktemp("encode")
    common = [f"storage.root={root}/store", f"tracking.uri=sqlite:///{root}/mlruns.db"]
    stages.load("synthesize").run(compose("stage=synthesize", *DATA, *common))
    stages.load("prepare").run(compose("stage=prepare", "experiment=ci", "stage.max_rows_per_file=25", *common))
    torch.manual_seed(0)
    build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(root / "first_stage")
    return root, common


def encode_cfg(root, common, *overrides):
    return compose(
        "stage=encode_latents", "experiment=ci", f"stage.first_stage={root}/first_stage", *common, *overrides
    )


def read_dir(storage, url):
    fs, path = storage.fsspec(url)
    return pa.concat_tables(pq.read_table(fs.open(p, "rb")) for p in sorted(fs.glob(f"{path}/*.parquet")))


def test_every_prepared_row_once_with_a_posterior_that_decodes_like_the_direct_path(prepared):
    root, common = prepared
    manifest = stages.load("encode_latents").run(encode_cfg(root, common))
    storage = Storage(root=str(root))
    verify(storage, f"{root}/store/latents", stage="encode_latents")
    source = pq.read_table(f"{root}/store/prepared/shards")
    latents = read_dir(storage, f"{root}/store/latents/shards")

    keys = latents["key"].to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == set(source["key"].to_pylist())
    # Prepare's held-out rows are encoded apart (train_ldm's held-out loss), never among the training shards.
    held_out = pq.read_table(f"{root}/store/prepared/held_out", columns=["key"])["key"].to_pylist()
    held_latents = read_dir(storage, f"{root}/store/latents/held_out")["key"].to_pylist()
    assert held_out and sorted(held_latents) == sorted(held_out) and not set(held_out) & set(keys)
    assert manifest["counts"] == {
        "rows_in": len(source),
        "rows_out": len(source),
        "held_out": len(held_out),
        "dropped": {"undecodable": 0},
    }
    # The manifest lists every part's row groups (train_ldm plans its epochs from them), as the files hold them.
    for name, groups in manifest["row_groups"].items():
        meta = pq.ParquetFile(f"{root}/store/latents/{name}").metadata
        assert groups == [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] and max(groups) <= 128
    assert sorted(manifest["row_groups"]) == sorted(f for f in manifest["files"] if f.endswith(".parquet"))
    mean, logvar = column_array(latents["latent_mean"]), column_array(latents["latent_logvar"])
    assert mean.shape == logvar.shape == (len(source), 4, 16, 16) and mean.dtype == np.float16
    assert manifest["facts"]["latent_shape"] == [4, 16, 16] and manifest["facts"]["first_stage"]["kind"] == "kl"

    by_key = {
        row["key"]: row for row in source.select(["key", "caption", "input_ids", "image", "label", "boxes"]).to_pylist()
    }
    order = [by_key[k] for k in keys]
    # What the tasks condition on goes with each latent: caption and tokens, class and layout.
    for column in ("caption", "input_ids", "label", "boxes"):
        assert latents[column].to_pylist() == [r[column] for r in order]
    assert all(r["label"] and r["boxes"] for r in order)
    # The class vocabulary: every class the training rows name, sorted (a class's index is its place in it).
    assert manifest["facts"]["classes"] == sorted({r["label"] for r in order})

    # The stored mean decodes to what encode -> decode gives directly, up to float16 rounding.
    model = load_first_stage(f"{root}/first_stage").eval()
    images = torch.from_numpy(normalise(np.stack([square_crop(r["image"], 64) for r in order[:16]])))
    with torch.no_grad():
        direct = decode(model, encode(model, images).mode())
        stored = decode(model, torch.tensor(mean[:16]).float())
    direct_error = (direct - images).abs().mean()
    assert (stored - direct).abs().max() < 0.02 and abs((stored - images).abs().mean() - direct_error) < 1e-3

    # The manifest's statistics are those of the stored data, recomputed here from scratch.
    z_var = mean.astype(np.float64).var(axis=(0, 2, 3)) + np.exp(logvar.astype(np.float64)).mean(axis=(0, 2, 3))
    facts = manifest["facts"]
    assert np.allclose(facts["channel_mean"], mean.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    assert np.allclose(facts["channel_std"], np.sqrt(z_var), rtol=1e-9)
    overall = mean.astype(np.float64).var() + np.exp(logvar.astype(np.float64)).mean()
    assert facts["scale_factor"] == pytest.approx(1 / np.sqrt(overall), rel=1e-9)
    assert facts["first_stage"]["sha256"] and facts["first_stage"]["location"] == f"{root}/first_stage"
    assert len(load_tokenizer(facts["tokenizer"]["path"])) == facts["tokenizer"]["vocab_size"]

    again = stages.load("encode_latents").run(encode_cfg(root, common))
    assert again["created_at"] == manifest["created_at"]  # same config: nothing to do


def test_vq_first_stage_on_s3_stores_the_quantized_latent(ray_cluster, s3_server, tmp_path):
    s3 = ["storage=s3", f"storage.bucket={BUCKET}", "storage.prefix=encode-e2e", f"storage.endpoint_url={s3_server}"]
    common = [*s3, f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"]
    stages.load("synthesize").run(
        compose("stage=synthesize", "data.num_samples=120", "stage.rows_per_shard=40", *common)
    )
    stages.load("prepare").run(compose("stage=prepare", "data.num_samples=120", *common))
    storage = Storage(root=f"s3://{BUCKET}/encode-e2e", endpoint_url=s3_server)
    fs, path = storage.fsspec(storage.url("vq"))
    build_first_stage(first_stage_preset("tiny-vq-f4")).save_pretrained(tmp_path / "vq")
    fs.put(str(tmp_path / "vq"), path, recursive=True)

    manifest = stages.load("encode_latents").run(
        compose(
            "stage=encode_latents",
            "data.num_samples=120",
            *common,
            f"stage.first_stage={storage.url('vq')}",
        )
    )
    latents = read_dir(storage, storage.url("latents", "shards"))
    prepared_keys = read_dir(storage, storage.url("prepared", "shards"))["key"].to_pylist()
    assert sorted(latents["key"].to_pylist()) == sorted(prepared_keys)
    assert "latent_mean" not in latents.column_names and column_array(latents["latent"]).shape == (
        len(latents),
        4,
        16,
        16,
    )
    assert manifest["facts"]["latent_columns"] == ["latent"] and manifest["facts"]["first_stage"]["kind"] == "vq"
    assert manifest["facts"]["tokenizer"]["path"] == storage.url("prepared", "tokenizer")


def test_a_killed_run_resumes_to_the_same_keys_without_duplicates(prepared, tmp_path):
    root, common = prepared
    out = tmp_path / "latents"
    # A wider first stage (~9 s for these images here): a window to be killed in, between files.
    build_first_stage(
        first_stage_preset("tiny-kl-f4", block_out_channels=(64, 128, 128), layers_per_block=2)
    ).save_pretrained(tmp_path / "wide")
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        "stage=encode_latents",
        "experiment=ci",
        f"storage.root={root}/store",
        f"stage.first_stage={tmp_path}/wide",
        f"stage.output_url={out}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        "stage.resources.decode_batch_size=5",
        "stage.resources.encoder_batch_size=5",
        "stage.resources.block_mb=0.1",  # stream file by file
    ]
    finished = kill_midway(command, tmp_path, out / "_work" / "done", markers=1)
    files = sum(len(list((root / "store" / "prepared" / part).glob("*.parquet"))) for part in ("shards", "held_out"))
    assert 1 <= finished < files, "the run was not caught mid-way"
    assert not (out / "_manifest.json").exists()

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"encode_latents: resuming: {finished} of {files} prepared file(s) already encoded" in result.stdout
    keys = read_dir(Storage(root=str(tmp_path)), str(out / "shards"))["key"].to_pylist()
    prepared_keys = pq.read_table(f"{root}/store/prepared/shards", columns=["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == set(prepared_keys)
    assert not (out / "_work").exists()


def test_an_undecodable_image_is_dropped_and_counted_not_fatal(prepared, tmp_path):
    """The stage's three steps in-process on one batch with a broken image: dropped, counted, never written."""
    root, _ = prepared
    batch = pq.read_table(f"{root}/store/prepared/shards", columns=[*encode_remote.CARRIED, "image"]).slice(0, 6)
    images = batch["image"].to_pylist()
    images[2] = images[2][: len(images[2]) // 3]  # cut short, as a failed download is
    batch = batch.set_column(batch.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    path = tmp_path / "prepared" / "shards" / "part-00000-0000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(batch, path)

    # Read 4 rows at a time: the file comes as two blocks, each row carrying its file.
    first, second = encode_remote.decode(
        pa.table({"path": [str(path)]}), storage=Storage(root=str(tmp_path)), resolution=64, batch_rows=4
    )
    assert (len(first), len(second)) == (4, 2) and set(first["path"].to_pylist() + second["path"].to_pylist()) == {
        str(path)
    }
    decoded = pa.concat_tables([first, second])
    assert decoded["reason"].to_pylist() == [None, None, "undecodable", None, None, None]
    encoder = Encoder(
        f"{root}/first_stage",
        None,
        Storage(root=str(root)),
        "cpu",
        "bfloat16",
        1,
        64,
        release_every=1,
        text_encoder=None,
        text_encoder_subfolder=None,
    )
    [report] = encode_remote.write(
        encoder(decoded), storage=Storage(root=str(tmp_path)), out=str(tmp_path), compression="zstd", row_group_rows=128
    ).to_pylist()
    assert (report["rows"], report["undecodable"]) == (5, 1)
    written = pq.read_table(tmp_path / report["file"])
    assert written["key"].to_pylist() == [k for i, k in enumerate(batch["key"].to_pylist()) if i != 2]
    stats = LatentStats.of({c: column_array(written[c]) for c in ("latent_mean", "latent_logvar")})
    assert (report["count"], report["sum"]) == (stats.count, stats.sum)


def test_a_resource_plan_that_would_starve_the_readers_is_refused(prepared):
    root, common = prepared
    with pytest.raises(
        ValueError,
        match=r"stage.resources.encoder_concurrency: 4 x 1, a decode or write task .*: 1 x 1 CPU at once: "
        r"5 CPU, the local cluster has 4 \(cluster.num_cpus\)",
    ):
        stages.load("encode_latents").run(
            encode_cfg(root, common, "stage.output_url=" + str(root / "never"), "stage.resources.encoder_concurrency=4")
        )
