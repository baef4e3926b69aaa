"""download.py (and train_dl_camal.py on what it fetched) against a real HTTP server on 127.0.0.1 (the tests never reach
the network).

The server holds tiny archives in the official formats (Pets' images and annotations tarballs with trimaps and the list
files, Flowers' 102flowers.tgz, .mat files and segmentation archive) at the official paths, and --download-mirror points
the downloads at it. The expected checksums are the tiny archives' own (patched in-process into torchvision's tables,
where the real ones live). Each download is checked, extracted and trained on; a second call fetches nothing; a corrupt
archive, a dropped connection and no server at all are clear errors that leave nothing a later run mistakes for data.
"""

import hashlib
import io
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch
import torchvision

from conftest import ROOT, load_script

dl = load_script("train_dl_camal")
download = load_script("download")


class Handler(SimpleHTTPRequestHandler):
    """Serves server.files (path -> bytes), counts the GETs, and cuts the paths in server.drop off halfway."""

    def do_GET(self):
        self.server.gets.append(self.path)
        if self.path in self.server.stall:  # a server that takes the connection and never answers
            time.sleep(30)
            return
        self.send_head_and_body(body=True)

    def do_HEAD(self):
        self.send_head_and_body(body=False)

    def send_head_and_body(self, body):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data[: len(data) // 2] if self.path in self.server.drop else data)
            if self.path in self.server.drop:
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                except OSError:
                    pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.gets, srv.drop, srv.stall = {}, [], set(), set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()


def tar_gz(folder, names):
    """A .tar.gz of folder's entries `names`, as the official archives hold them (the top folder in every path)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            tar.add(folder / name, arcname=name)
    return buf.getvalue()


def serve_official(server, monkeypatch, tmp_path, dataset):
    """The dataset's official files, tiny, at their official paths on the server; torchvision's checksums set to
    theirs."""
    from test_dl_data import make_flowers, make_pets
    from torchvision.datasets import Flowers102, OxfordIIITPet

    src = tmp_path / "src"
    if dataset == "pets":
        make_pets(src)
        base = src / "oxford-iiit-pet"
        (base / "annotations" / "list.txt").write_text("# Image CLASS-ID SPECIES BREED ID\n")
        blobs = {"images.tar.gz": tar_gz(base, ["images"]), "annotations.tar.gz": tar_gz(base, ["annotations"])}
        resources = [
            (url, hashlib.md5(blobs[url.rsplit("/", 1)[1]]).hexdigest()) for url, _ in OxfordIIITPet._RESOURCES
        ]
        monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", tuple(resources))
        urls = [url for url, _ in resources]
    else:
        make_flowers(src)
        base = src / "flowers-102"
        blobs = {
            "102flowers.tgz": tar_gz(base, ["jpg"]),
            "102segmentations.tgz": tar_gz(base, ["segmim"]),
            "imagelabels.mat": (base / "imagelabels.mat").read_bytes(),
            "setid.mat": (base / "setid.mat").read_bytes(),
        }
        md5 = {name: hashlib.md5(b).hexdigest() for name, b in blobs.items()}
        monkeypatch.setattr(
            Flowers102, "_file_dict", {k: (name, md5[name]) for k, (name, _) in Flowers102._file_dict.items()}
        )
        monkeypatch.setattr(download, "FLOWERS_SEGMENTATIONS", ("102segmentations.tgz", md5["102segmentations.tgz"]))
        urls = [Flowers102._download_url_prefix + name for name in blobs]
    for url in urls:
        server.files[urlsplit(url).path] = blobs[url.rsplit("/", 1)[1]]
    return {urlsplit(url).path: url.rsplit("/", 1)[1] for url in urls}


@pytest.mark.slow
def test_pets_download_verify_and_train(server, monkeypatch, tmp_path, capsys):
    paths = serve_official(server, monkeypatch, tmp_path, "pets")
    data = tmp_path / "data"
    download.download_dataset("pets", str(data), server.url)
    assert set(server.gets) == set(
        paths
    )  # torchvision's download opens each URL twice (a redirect check, then the file)
    gets = len(server.gets)
    records, classes = dl.pets_records(str(data))
    assert classes == ["Abyssinian", "beagle"] and len(records) == 6
    capsys.readouterr()
    download.download_dataset("pets", str(data), server.url)  # a second call verifies and fetches nothing
    assert len(server.gets) == gets and "is in place and its archive matches its checksum" in capsys.readouterr().out
    assert not list(data.glob("**/*.part")) and not list(data.glob("**/*.partial"))
    # the downloaded tree trains, as a user runs it
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_dl_camal.py"),
            "--dataset",
            "pets",
            "--data-dir",
            str(data),
            "--no-pretrained",
            "--epochs",
            "1",
        ]
        + ["--folds", "2", "--batch-size", "4", "--image-size", "64"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "metrics.json").is_file()


def test_flowers_download_with_its_segmentations(server, monkeypatch, tmp_path):
    serve_official(server, monkeypatch, tmp_path, "flowers")
    data = tmp_path / "data"
    download.download_dataset("flowers", str(data), server.url)
    records, classes = dl.flowers_records(str(data))
    assert len(records) == 6 and classes == ["pink primrose", "hard-leaved pocket orchid"]
    mask = dl.read_mask("flowers", records[0][1])
    assert 0.2 < mask.mean() < 0.4  # the flower box of the blue-background segmentation


@pytest.mark.parametrize("fault", ["corrupt", "dropped"])
def test_a_bad_download_leaves_nothing(server, monkeypatch, tmp_path, fault):
    paths = serve_official(server, monkeypatch, tmp_path, "pets")
    bad = next(p for p, name in paths.items() if name == "annotations.tar.gz")
    good = server.files[bad]
    if fault == "corrupt":
        server.files[bad] = server.files[bad][:-100] + b"\0" * 100
    else:
        server.drop.add(bad)
    data = tmp_path / "data"
    # a dropped connection ends the file early: the checksum finds it
    words = "does not match its checksum .*cut short or corrupt"
    with pytest.raises(download.DownloadError, match=words):
        download.download_dataset("pets", str(data), server.url)
    root = data / "oxford-iiit-pet"
    assert (
        not (root / "annotations").exists()
        and not list(root.glob(".annotations*"))
        and not list(root.glob("**/*.part"))
    )
    assert not (root / ".downloads" / "annotations.tar.gz").exists()
    with pytest.raises(FileNotFoundError):  # what is there is not taken for the dataset
        dl.pets_records(str(data))
    server.drop.clear()  # the server is whole again: the next call completes the tree, fetching only what is missing
    server.files[bad] = good
    gets = len(server.gets)
    download.download_dataset("pets", str(data), server.url)
    assert set(server.gets[gets:]) == {bad} and len(dl.pets_records(str(data))[0]) == 6


def test_a_server_that_never_answers_times_out(server, monkeypatch, tmp_path):
    """A download from a server that takes the connection and sends nothing fails after DOWNLOAD_TIMEOUT, with a
    message, for the datasets and for torch.hub's weights alike (urllib itself would wait for ever)."""
    paths = serve_official(server, monkeypatch, tmp_path, "pets")
    server.stall.update(paths)
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 1)
    start = time.time()
    with pytest.raises(download.DownloadError, match="the server sent nothing for 1 s"):
        download.download_dataset("pets", str(tmp_path / "data"), server.url)
    url = urlsplit(download.weights_url("resnet18")).path
    server.stall.add(url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(download.RunFileError, match="the server sent nothing for 1 s"):
        download.imagenet_state_dict("resnet18", None, server.url)
    assert time.time() - start < 20 and not list((tmp_path / "data").glob("**/*.part"))


def test_what_is_already_there_is_used_and_a_stale_part_is_not(server, monkeypatch, tmp_path, capsys):
    """A tree unpacked by hand is used without a request (a job script that always passes --download runs offline);
    archives torchvision's own download left in the dataset's folder are used, not fetched again; a .part a killed
    download left is fetched over, not taken for the file."""
    from test_dl_data import make_pets

    paths = serve_official(server, monkeypatch, tmp_path, "pets")
    by_name = {name: server.files[path] for path, name in paths.items()}
    by_hand = tmp_path / "by_hand"
    make_pets(by_hand)
    download.download_dataset("pets", str(by_hand), "http://127.0.0.1:9")  # nothing listens there
    assert "images is already in" in capsys.readouterr().out and len(dl.pets_records(str(by_hand))[0]) == 6
    left = tmp_path / "left" / "oxford-iiit-pet"
    left.mkdir(parents=True)
    for name, blob in by_name.items():
        (left / name).write_bytes(blob)
    download.download_dataset("pets", str(left.parent), server.url)
    assert not server.gets and len(dl.pets_records(str(left.parent))[0]) == 6
    stale = tmp_path / "stale" / "oxford-iiit-pet" / ".downloads"
    stale.mkdir(parents=True)
    (stale / "annotations.tar.gz.part").write_bytes(by_name["annotations.tar.gz"][:50])  # killed halfway
    download.download_dataset("pets", str(stale.parent.parent), server.url)
    assert set(server.gets) == set(paths)  # the annotations fetched too: the stale .part was not taken for them
    assert len(dl.pets_records(str(stale.parent.parent))[0]) == 6


@pytest.mark.slow
def test_regularizer_study_downloads_too(tmp_path):
    """The study's --download is the same tested copy; wired in before the data is read (busi: where to get it, exit
    code 2)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "regularizer_study.py"),
            "--dataset",
            "busi",
            "--data-dir",
            str(tmp_path),
            "--download",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "BUSI has no stable direct link" in proc.stderr and "Traceback" not in proc.stderr


def test_no_network_and_busi_say_what_to_do(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(
        download.DownloadError,
        match="cannot download .*Without a network, put the files there by hand: DATA/oxford-iiit-pet/images",
    ):
        download.download_dataset("pets", str(tmp_path / "data"), f"http://127.0.0.1:{port}")
    with pytest.raises(download.DownloadError, match="BUSI has no stable direct link"):
        download.download_dataset("busi", str(tmp_path / "data"))


def test_imagenet_weights_come_through_torch_hub(server, monkeypatch, tmp_path):
    """torchvision's weights, served under a name whose hash prefix torch.hub checks, into $TORCH_HOME; a wrong file is
    refused."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    good = buf.getvalue()
    name = f"resnet18-{hashlib.sha256(good).hexdigest()[:8]}.pth"
    server.files[f"/models/{name}"] = good
    monkeypatch.setattr(download, "weights_url", lambda model: f"https://download.pytorch.org/models/{name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    loaded = download.imagenet_state_dict("resnet18", None, server.url)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).is_file()
    download.imagenet_state_dict("resnet18", None, server.url)  # cached: not fetched again
    assert server.gets.count(f"/models/{name}") == 1
    (tmp_path / "torch" / "hub" / "checkpoints" / name).unlink()
    server.files[f"/models/{name}"] = good[:-10] + b"0123456789"  # the hash in the name no longer matches
    with pytest.raises(download.RunFileError, match="cannot download the ImageNet weights of resnet18 .*put resnet18-"):
        download.imagenet_state_dict("resnet18", None, server.url)
    assert not list((tmp_path / "torch" / "hub" / "checkpoints").iterdir())


@pytest.mark.slow
def test_clip_prior_weights_come_through_open_clip(tmp_path):
    """--prior-pretrained TAG goes through open_clip's own pretrained mechanism (Hugging Face's hub and cache); offline
    (the hub told so, so nothing is attempted), the message says how to do without; an unknown tag is refused at the
    door."""
    pytest.importorskip("open_clip", reason="requirements-prior.txt")
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = [
        "--method",
        "prior",
        "--prior-model",
        "ViT-B-32",
        "--prior-pretrained",
        "openai",
        "--shapes-per-class",
        "4",
        "--folds",
        "2",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_dl_camal.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot get open_clip's ViT-B-32 weights 'openai'" in proc.stderr and "--prior-weights PATH" in proc.stderr
    with pytest.raises(ValueError, match="is not a tag of ViT-B-32; its tags: openai"):
        dl.check_args(
            dl.Args(method="prior", prior_model="ViT-B-32", prior_pretrained="nonsense", learning_rate=1e-3, epochs=1)
        )


@pytest.mark.slow
def test_clip_prior_without_a_name_service_fails_at_once(tmp_path):
    """Not told it is offline, with a hub whose host does not resolve (.invalid never does): one message within
    seconds, not a minute of Hugging Face's retries and 47 lines of its warnings."""
    pytest.importorskip("open_clip", reason="requirements-prior.txt")
    import os

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "c"))
    args = ["--method", "prior", "--prior-model", "ViT-B-32", "--prior-pretrained", "openai", "--epochs", "1"]
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_dl_camal.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and "cannot get open_clip's ViT-B-32 weights 'openai'" in proc.stderr, proc.stderr
    assert "Retrying" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert time.time() - start < 40


def test_another_models_weights_are_named_with_what_differs(tmp_path):
    """A --weights file of another model (resnet34's for resnet18, a resnet18 with 10 classes) says what differs, not
    only torch's first line ("Error(s) in loading state_dict for ResNet:")."""
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(
        download.RunFileError, match=r"is not ImageNet weights of resnet18: .*tensors the model does not"
    ):
        download.imagenet_state_dict("resnet18", str(path))
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    words = r"2 of another shape \(e.g. fc.weight: 10 x 512 in the file, 1000 x 512 wanted\)"
    with pytest.raises(download.RunFileError, match=words):
        download.imagenet_state_dict("resnet18", str(path))
