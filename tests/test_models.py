"""Model cards and the model cache: pull over real HTTP and S3 servers, reject wrong hashes, clear errors."""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from bfr_models import model_fetch, models


def _weights(seed: int, size: int = 3 * (1 << 20) + 12345) -> bytes:
    """Deterministic bytes standing in for a weight file, larger than one read chunk."""
    out, block, i = bytearray(), b"", 0
    while len(out) < size:
        block = hashlib.sha256(block + seed.to_bytes(4, "little") + i.to_bytes(8, "little")).digest()
        out += block * 64
        i += 1
    return bytes(out[:size])


def _card_yaml(name: str, filename: str, url: str, *, sha256: str | None = None, hash_prefix: str | None = None,
               extra: str = "") -> str:
    hash_line = f"sha256: {sha256}" if sha256 else f"hash_prefix: '{hash_prefix}'"
    return (f"name: {name}\nfilename: {filename}\nurl: {url}\n{hash_line}\nlicense: MIT\n"
            f"used_by: [tests]\ndescription: a test card\n{extra}")


@pytest.fixture
def catalog(tmp_path, monkeypatch):
    """An empty temp catalog and model cache, set through the environment for this test only."""
    root = tmp_path / "catalogs"
    (root / "models").mkdir(parents=True)
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("BFR_CURATE_CATALOGS", str(root))
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(cache))

    def write(name, filename, url, **kw):
        (root / "models" / f"{name}.yaml").write_text(_card_yaml(name, filename, url, **kw))

    write.root, write.cache = root, cache
    return write


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a temp folder (no Range support, like many simple hosts)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_pull_over_http_verifies_and_stores(catalog, http_folder):
    folder, base = http_folder
    data = _weights(1)
    (folder / "net-a.pth").write_bytes(data)
    catalog("net_a", "net-a.pth", f"{base}/net-a.pth", sha256=hashlib.sha256(data).hexdigest())

    assert models.state(models.get_card("net_a")) == "missing"
    path = model_fetch.pull("net_a", progress=False)
    assert path == catalog.cache / "net-a.pth"
    assert path.read_bytes() == data
    assert models.model_path("net_a") == path
    assert models.state(models.get_card("net_a")) == "verified"
    # only the file and its hidden verification record; no temp files left over
    assert _cache_files(catalog.cache) == [".net-a.pth.verified.json", "net-a.pth"]
    # pulling again keeps the verified file without downloading (the server copy is gone)
    (folder / "net-a.pth").unlink()
    assert model_fetch.pull("net_a", progress=False) == path


def test_pull_from_moto_s3(catalog, s3_bucket):
    import s3fs

    data = _weights(2)
    s3fs.S3FileSystem().pipe_file(f"{s3_bucket}/weights/net-b.pth", data)
    catalog("net_b", "net-b.pth", f"{s3_bucket}/weights/net-b.pth", sha256=hashlib.sha256(data).hexdigest())

    path = model_fetch.pull("net_b", progress=False)
    assert path.read_bytes() == data
    assert models.require(["net_b"]) == {"net_b": path}


def test_pull_rejects_a_file_whose_hash_differs_and_stores_nothing(catalog, http_folder, s3_bucket):
    import s3fs

    folder, base = http_folder
    data, other = _weights(3), _weights(4)
    (folder / "net-c.pth").write_bytes(other)
    s3fs.S3FileSystem().pipe_file(f"{s3_bucket}/net-c.pth", other)
    expected = hashlib.sha256(data).hexdigest()
    catalog("net_c", "net-c.pth", f"{base}/net-c.pth", sha256=expected)

    for source in (None, f"{s3_bucket}/net-c.pth"):
        with pytest.raises(models.ModelHashError) as err:
            model_fetch.pull("net_c", source=source, progress=False)
        msg = str(err.value)
        assert "\n" not in msg
        assert expected in msg and hashlib.sha256(other).hexdigest() in msg
        assert _cache_files(catalog.cache) == []
    with pytest.raises(models.ModelMissingError):
        models.model_path("net_c")


def test_hash_prefix_cards_work(catalog, http_folder):
    folder, base = http_folder
    data = _weights(5)
    digest = hashlib.sha256(data).hexdigest()
    name = f"net-d-{digest[:8]}.pth"  # torchvision-style published name
    (folder / name).write_bytes(data)
    catalog("net_d", name, f"{base}/{name}", hash_prefix=digest[:8])
    assert model_fetch.pull("net_d", progress=False).read_bytes() == data

    bad = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    catalog("net_e", "net-e.pth", f"{base}/{name}", hash_prefix=bad)
    with pytest.raises(models.ModelHashError, match=f"starting with {bad}"):
        model_fetch.pull("net_e", progress=False)
    assert not (catalog.cache / "net-e.pth").exists()


def test_override_url_and_mirrors(catalog, http_folder, tmp_path):
    folder, base = http_folder
    data = _weights(6)
    sha = hashlib.sha256(data).hexdigest()
    (folder / "mirror.pth").write_bytes(data)
    local = tmp_path / "elsewhere.pth"
    local.write_bytes(data)
    # the card's URL is dead (404); its mirror has the file
    catalog("net_f", "net-f.pth", f"{base}/gone.pth", sha256=sha,
            extra=f"extra:\n  mirror_urls: ['{base}/mirror.pth']\n")
    assert model_fetch.pull("net_f", progress=False).read_bytes() == data
    # --from-url with a file:// URL
    catalog("net_g", "net-g.pth", f"{base}/gone.pth", sha256=sha)
    assert model_fetch.pull("net_g", source=local.as_uri(), progress=False).read_bytes() == data


def test_unreachable_source_is_one_clear_error(catalog, http_folder):
    _, base = http_folder
    catalog("net_h", "net-h.pth", f"{base}/gone.pth", sha256="a" * 64)
    with pytest.raises(models.ModelDownloadError) as err:
        model_fetch.pull("net_h", progress=False)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in msg and "gone.pth" in msg and "bfr-curate models add net_h --from PATH" in msg
    assert _cache_files(catalog.cache) == []


def test_model_path_of_missing_model_is_one_line_naming_file_and_command(catalog):
    catalog("net_i", "net-i-1234abcd.pth", "https://example.invalid/net-i.pth", hash_prefix="1234abcd")
    with pytest.raises(models.ModelMissingError) as err:
        models.model_path("net_i")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in msg
    assert "net-i-1234abcd.pth" in msg
    assert str(catalog.cache) in msg
    assert "bfr-curate models pull net_i" in msg
    assert "bfr-curate models add net_i --from PATH" in msg
    # stages run in Dask / Prefect workers: the error must survive pickling unchanged
    import pickle

    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is models.ModelMissingError and str(again) == msg
    assert [c.name for c in again.missing] == ["net_i"]


def test_unknown_model_lists_known_names(catalog):
    catalog("net_j", "net-j.pth", "https://example.invalid/j", sha256="b" * 64)
    with pytest.raises(models.ModelCardError, match="unknown model 'nope'.*net_j"):
        models.model_path("nope")


def test_add_registers_a_local_file(catalog, tmp_path):
    data = _weights(7)
    sha = hashlib.sha256(data).hexdigest()
    catalog("net_k", "net-k.pth", "https://example.invalid/net-k.pth", sha256=sha)
    mine = tmp_path / "downloads" / "whatever-name.pth"
    mine.parent.mkdir()
    mine.write_bytes(data)

    path = model_fetch.add("net_k", mine, progress=False)
    assert path == catalog.cache / "net-k.pth" and path.read_bytes() == data
    assert mine.exists()  # copied, not moved
    assert models.model_path("net_k") == path
    assert models.verify(path, models.get_card("net_k")) == sha

    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(_weights(8))
    catalog("net_l", "net-l.pth", "https://example.invalid/net-l.pth", sha256=sha)
    with pytest.raises(models.ModelHashError):
        model_fetch.add("net_l", wrong, progress=False)
    assert not (catalog.cache / "net-l.pth").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_fetch.add("net_l", tmp_path / "absent.pth", progress=False)


def test_require_names_every_missing_file(catalog, tmp_path):
    data = _weights(9, size=1000)
    catalog("net_m", "net-m.pth", "https://example.invalid/m", sha256=hashlib.sha256(data).hexdigest())
    catalog("net_n", "net-n-abcdef01.pth", "https://example.invalid/n", hash_prefix="abcdef01")
    catalog("net_o", "net-o.pth", "https://example.invalid/o", sha256="c" * 64)
    src = tmp_path / "m.pth"
    src.write_bytes(data)
    model_fetch.add("net_m", src, progress=False)

    with pytest.raises(models.ModelMissingError) as err:
        models.require(["net_m", "net_n", "net_o"])
    msg = str(err.value)
    assert "\n" not in msg
    assert "net-n-abcdef01.pth" in msg and "net-o.pth" in msg and "net-m.pth" not in msg
    assert "bfr-curate models pull net_n net_o" in msg
    assert [c.name for c in err.value.missing] == ["net_n", "net_o"]
    assert [c.name for c in models.missing(["net_m", "net_n", "net_o"])] == ["net_n", "net_o"]
    assert models.require(["net_m"]) == {"net_m": catalog.cache / "net-m.pth"}


def test_a_file_copied_into_the_cache_by_hand_is_verified_on_first_use(catalog):
    data = _weights(10, size=5000)
    catalog("net_p", "net-p.pth", "https://example.invalid/p", sha256=hashlib.sha256(data).hexdigest())
    catalog.cache.mkdir(parents=True)
    (catalog.cache / "net-p.pth").write_bytes(data)
    assert models.state(models.get_card("net_p")) == "unverified"
    assert models.model_path("net_p") == catalog.cache / "net-p.pth"
    assert models.state(models.get_card("net_p")) == "verified"

    (catalog.cache / "net-p.pth").write_bytes(b"corrupted" + data[9:])  # same size, new mtime: re-hashed
    os.utime(catalog.cache / "net-p.pth", ns=(1, 1))
    with pytest.raises(models.ModelHashError, match="bfr-curate models pull net_p"):
        models.model_path("net_p")


@pytest.mark.parametrize("text, field", [
    ("filename: a.pth\nurl: x\nlicense: MIT\nused_by: [t]\ndescription: d\n", "sha256"),
    ("filename: a.pth\nurl: x\nsha256: abc\nlicense: MIT\nused_by: [t]\ndescription: d\n", "sha256"),
    ("filename: a.pth\nurl: x\nsha256: '" + "a" * 64 + "'\nhash_prefix: aaaaaaaa\nlicense: MIT\n"
     "used_by: [t]\ndescription: d\n", "sha256"),
    ("filename: a.pth\nurl: x\nhash_prefix: abc\nlicense: MIT\nused_by: [t]\ndescription: d\n", "hash_prefix"),
    ("filename: ../a.pth\nurl: x\nhash_prefix: abcdabcd\nlicense: MIT\nused_by: [t]\ndescription: d\n", "filename"),
    ("filename: a.pth\nurl: x\nhash_prefix: abcdabcd\nused_by: [t]\ndescription: d\n", "license"),
    ("filename: a.pth\nurl: x\nhash_prefix: abcdabcd\nlicense: MIT\nused_by: t\ndescription: d\n", "used_by"),
    ("name: other\nfilename: a.pth\nurl: x\nhash_prefix: abcdabcd\nlicense: MIT\nused_by: [t]\ndescription: d\n",
     "name"),
    ("filename: a.pth\nurl: x\nhash_prefix: abcdabcd\nlicense: MIT\nused_by: [t]\ndescription: d\nsha: 1\n", "sha"),
    ("filename: a.pth\nurl: x\nhash_prefix: abcdabcd\nlicense: MIT\nused_by: [t]\ndescription: d\n"
     "extra: {size_bytes: -3}\n", "extra"),
])
def test_malformed_cards_name_the_file_and_field(catalog, text, field):
    path = catalog.root / "models" / "bad.yaml"
    path.write_text(text)
    with pytest.raises(models.ModelCardError) as err:
        models.load_cards()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and f"field '{field}'" in msg


def test_invalid_yaml_names_the_file(catalog):
    path = catalog.root / "models" / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(models.ModelCardError, match="broken.yaml.*not valid YAML"):
        models.load_cards()


def test_real_cards_parse():
    cards = models.load_cards(Path(__file__).resolve().parents[1] / "catalogs")
    assert {"musiq_koniq", "lpips_vgg16_backbone", "lpips_alex_backbone", "fid_inception_clean",
            "fid_inception_pytorch"} <= set(cards)
    for card in cards.values():
        assert card.url.startswith("https://")
        assert card.license and card.used_by and card.description
        # torchvision/pyiqa-style names carry the sha256 prefix: the card's hash must agree with it
        stem = card.filename.rsplit(".", 1)[0]
        tail = stem.rsplit("-", 1)[-1]
        if len(tail) == 8 and all(ch in "0123456789abcdef" for ch in tail):
            assert (card.sha256 or card.hash_prefix).startswith(tail), card.name


# --------------------------------------------------------------------------- CLI


def _cli(argv):
    from flows.models_cli import add_models_parser

    parser = argparse.ArgumentParser(prog="bfr-curate")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_list_pull_add(catalog, http_folder, tmp_path, capsys):
    folder, base = http_folder
    a, b = _weights(11, size=4000), _weights(12, size=4000)
    (folder / "a.pth").write_bytes(a)
    catalog("cli_a", "a.pth", f"{base}/a.pth", sha256=hashlib.sha256(a).hexdigest())
    catalog("cli_b", "b.pth", f"{base}/b.pth", sha256=hashlib.sha256(b).hexdigest())

    _cli(["models", "list"])
    out = capsys.readouterr().out
    assert "name" in out and "licence" in out and "used by" in out
    assert "cli_a" in out and "a.pth" in out and "0 of 2 present" in out

    _cli(["models", "pull", "cli_a", "--quiet"])
    assert str(catalog.cache / "a.pth") in capsys.readouterr().out

    with pytest.raises(models.ModelDownloadError):  # cli_b is not served
        _cli(["models", "pull", "--all", "--quiet"])
    assert "cli_b: FAILED" in capsys.readouterr().out

    src = tmp_path / "b-copy.pth"
    src.write_bytes(b)
    _cli(["models", "add", "cli_b", "--from", str(src), "--quiet"])
    _cli(["models", "list", "--verify"])
    out = capsys.readouterr().out
    assert "2 of 2 present" in out and f"yes {catalog.cache / 'b.pth'}" in out

    for argv in (["models", "pull"], ["models", "pull", "cli_a", "--all"],
                 ["models", "pull", "cli_a", "cli_b", "--from-url", f"{base}/a.pth"], ["models", "pull", "nope"]):
        with pytest.raises(ValueError):
            _cli(argv)


def test_unpinned_cards_say_not_pinned_and_never_verified(catalog, http_folder, tmp_path, capsys):
    folder, base = http_folder
    data = _weights(13, size=3000)
    digest = hashlib.sha256(data).hexdigest()
    (folder / "u.pth").write_bytes(data)
    (catalog.root / "models" / "net_u.yaml").write_text(_card_yaml("net_u", "u.pth", f"{base}/u.pth", sha256="unpinned"))
    src = tmp_path / "mine.pth"
    src.write_bytes(data)

    _cli(["models", "add", "net_u", "--from", str(src), "--quiet"])
    _cli(["models", "pull", "net_u", "--quiet", "--force"])
    _cli(["models", "list", "--verify"])
    models._WARNED_UNPINNED.clear()
    assert models.model_path("net_u") == catalog.cache / "u.pth"  # loading: one warning on stderr
    out, err = capsys.readouterr()
    assert out.count(f"net_u: {catalog.cache / 'u.pth'} (sha256 not pinned: {digest})") == 2  # add, pull
    assert f"yes {catalog.cache / 'u.pth'} (sha256 not pinned)" in out
    warning = (f"bfr-curate: model 'net_u' ({catalog.cache / 'u.pth'}): sha256 not pinned: {digest} "
               f"(pin it in its card to have it checked)")
    assert err.strip().splitlines() == [warning, warning]  # list --verify, then the load; once per process
    assert "verified" not in out.replace(".verified.json", "") + err
    assert models.state(models.get_card("net_u")) == "unpinned"
