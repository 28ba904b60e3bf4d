"""Real test services, each started once per session and only by the tests that ask for it:
a local Ray cluster, an S3-protocol server (moto) on 127.0.0.1, and an MLflow tracking server subprocess.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Set before any Ray worker exists, so every worker inherits them: the stages read S3 credentials from the
# standard AWS environment only. The secret is distinctive so that tests can prove it is never logged.
TEST_SECRET = "test-secret-key-must-never-be-logged"
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "HF_HUB_OFFLINE": "1",
    }
)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)
BUCKET = "ldm-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # address="local": never attach to a stale cluster recorded in /tmp/ray.
    ray.init(address="local", num_cpus=4, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield ray
    ray.shutdown()


def in_fresh_process(script: str, *args, cwd: Path) -> str:
    """Runs ``script`` in a new interpreter with nothing of this project's on its path, offline (what a user of an
    exported directory has); its stdout. Fails with its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="session")
def ci_latents(ray_cluster, tmp_path_factory) -> Path:
    """Latents of the ci corpus (240 synthesized images, prepared, under a random tiny-kl-f4 first stage) at
    ``<root>/store/latents``, made once for the modules that only read them (they write under their own root)."""
    from ldm.models.first_stage import build_first_stage
    from ldm.models.presets import first_stage_preset
    from pipelines import stages
    from pipelines.driver.config import compose

    root = tmp_path_factory.mktemp("ci_latents")
    common = ["experiment=ci", f"storage.root={root}/store", f"tracking.uri=sqlite:///{root}/mlruns.db"]
    stages.load("synthesize").run(compose("stage=synthesize", *common))
    stages.load("prepare").run(compose("stage=prepare", *common))
    build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(root / "first_stage")
    stages.load("encode_latents").run(compose("stage=encode_latents", *common, f"stage.first_stage={root}/first_stage"))
    return root


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol HTTP server on 127.0.0.1 with the bucket ``BUCKET``; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, artifacts proxied to the S3 server); yields its URI."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{workdir}/mlflow.db",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlartifacts",
        ],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", timeout=120, process=process)
    except Exception as err:
        process.kill()
        raise RuntimeError((workdir / "server.log").read_text()[-3000:]) from err
    yield uri
    process.terminate()
    process.wait(timeout=30)
    log.close()


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session: Ray workers run in process groups of their own."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_when(command: list[str], cwd: Path, ready: Callable[[], bool]) -> None:
    """Run a command as a session of its own and SIGKILL it (driver, the Ray cluster it started, workers) as
    soon as ``ready()`` holds."""
    log = cwd / "killed-run.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    while process.poll() is None and not ready():
        time.sleep(0.05)
    ended = process.poll()
    kill_session(process.pid)
    process.wait()
    assert ended is None, f"the run ended (exit {ended}) before it could be killed:\n{log.read_text()[-3000:]}"


def kill_midway(command: list[str], cwd: Path, done: Path, markers: int) -> int:
    """``kill_when`` ``done`` holds ``markers`` done markers; how many it holds after the kill."""
    kill_when(command, cwd, lambda: len(list(done.glob("*.json"))) >= markers)
    return len(list(done.glob("*.json")))


# What a console must not show: Ray's internal records (they stay in Ray's log files) and Python warnings (fixed
# at their cause instead).
CONSOLE_NOISE = re.compile(
    r"PlacementGroupCleaner|TrainingReport|Reporting training result|Execution plan of Dataset"
    r"|Starting execution of Dataset|\b\w*Warning: "
)


def console_noise(console: str) -> list[str]:
    """The lines of a stage's console that are Ray's internal chatter or Python warnings."""
    return [line for line in console.splitlines() if CONSOLE_NOISE.search(line)]


def write_lpips_weights(directory: Path) -> list[str]:
    """Random LPIPS weights as users hold the real ones: torchvision's VGG16 file (a torch pickle) and the
    LPIPS heads (here as safetensors). Random, because nothing may be downloaded; the maths is the same."""
    import torch
    from safetensors.torch import save_file

    from ldm.losses.lpips import CONVS, TAPS

    generator = torch.Generator().manual_seed(0)
    vgg = {}
    for index, (c_in, c_out) in CONVS.items():
        vgg[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=generator) * (2 / (9 * c_in)) ** 0.5
        vgg[f"features.{index}.bias"] = torch.zeros(c_out)
    vgg["classifier.0.weight"] = torch.zeros(1)  # torchvision's file has the classifier too: ignored
    heads = {
        f"lin{k}.model.1.weight": torch.rand(1, CONVS[tap][1], 1, 1, generator=generator) for k, tap in enumerate(TAPS)
    }
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, directory / "vgg16.pth")
    save_file(heads, str(directory / "lpips_vgg.safetensors"))
    return [str(directory / "vgg16.pth"), str(directory / "lpips_vgg.safetensors")]


def history(client, run_id, key):
    """(step, value) of an MLflow metric, by step."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def image_steps(client, run_id, key):
    """The steps of an MLflow image series (``log_image(key=, step=)``), as the UI's Images tab lists them."""
    names = [f.path for f in client.list_artifacts(run_id, "images")]
    return sorted(
        {int(name.split("+step+")[1].split("+")[0]) for name in names if name.startswith(f"images/{key}+step+")}
    )


class CorpusServer:
    """A real HTTP server on 127.0.0.1 that serves a synthesized corpus's images at the URLs of its metadata
    (synthesize with ``data.image_host=<server.url>``, then ``load`` its output), failing the way real LAION
    URLs fail. Each row's fate follows from its SAMPLE_ID and defect, so a test knows what every URL did:

    - the rows the corpus marks as failed downloads: 404, 500, a body cut short, or an answer slower than any
      sane timeout, in turn;
    - the undecodable rows: their bytes (an HTML error page) served as ``text/html``;
    - the truncated rows: their half JPEG, as an image;
    - every seventh other row: a 302 redirect to where the image is;
    - the rest: the image.
    """

    FAILURES = ("http_404", "http_500", "body_cut_short", "timeout")

    def __init__(self, slow_seconds: float = 4.0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.slow_seconds = slow_seconds
        self.rows: dict[int, tuple[str, bytes]] = {}  # SAMPLE_ID -> (what the server does, the bytes)
        self.pending: Path | None = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                moved = self.path.startswith("/moved/")
                try:
                    sample = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                    fate, body = server.row(sample)
                except (ValueError, KeyError):
                    return self.send_error(404)
                if fate == "http_404":
                    return self.send_error(404)
                if fate == "http_500":
                    return self.send_error(500)
                if fate == "timeout":
                    time.sleep(server.slow_seconds)
                if fate == "redirect" and not moved:
                    self.send_response(302)
                    self.send_header("Location", f"/moved{self.path}")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if fate == "not_an_image" else "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if fate == "body_cut_short" else body)

            def log_message(self, *args):  # quiet: thousands of requests
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 makes a burst of connections wait for SYN retries

            def handle_error(self, request, client_address):  # a client that gave up on a slow answer
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def load(self, raw: Path) -> None:
        """Serve the corpus synthesized into ``raw`` (its truth table and webdataset tars)."""
        import tarfile

        self.rows = {}
        import pyarrow.parquet as pq

        images = {}
        for tar_path in sorted((raw / "webdataset").glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        images[member.name[: -len(".jpg")]] = tar.extractfile(member).read()
        for row in pq.read_table(raw / "_truth.parquet").to_pylist():
            sample, defect = row["SAMPLE_ID"], row["defect"]
            if defect == "failed_download":
                fate = self.FAILURES[sample % len(self.FAILURES)]
            elif defect == "undecodable":
                fate = "not_an_image"
            elif defect == "truncated":
                fate = "half_an_image"  # a JPEG cut in half: some decoders give up, some fill in grey
            else:
                fate = "redirect" if sample % 7 == 0 else "image"
            self.rows[sample] = (fate, images.get(row["key"], b"\xff\xd8 never served"))

    def load_when_asked(self, raw: Path) -> None:
        """``load`` at the first request: for a corpus that is not written yet (a pipeline synthesizes it)."""
        self.rows, self.pending = {}, raw

    def row(self, sample: int) -> tuple[str, bytes]:
        with self.lock:
            if self.pending is not None:
                self.load(self.pending)
                self.pending = None
        return self.rows[sample]

    def fate(self, url: str) -> str:
        return self.rows[int(url.rsplit("/", 1)[-1].split(".")[0])][0]

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def corpus_server():
    server = CorpusServer()
    yield server
    server.close()
