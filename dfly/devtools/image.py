"""Build real multi-layer OCI images from files installed on this machine.

Each layer is a tar archive of real files (a shared library, licence texts, docs), written
deterministically: names sorted, owner 0:0, a fixed mtime, no user/group names.  The same inputs
therefore always give the same digests.  A layer is either gzip-compressed
(C{application/vnd.oci.image.layer.v1.tar+gzip}) or plain (C{...tar}); a big plain layer keeps its
size, which is what makes it worth distributing.  Everything is streamed: a layer is written to its
blob file while both its compressed and uncompressed sha256 are computed, never held in memory.

The result is an OCI image layout (C{oci-layout}, C{index.json}, C{blobs/sha256/...}) that
C{skopeo copy oci:DIR:TAG docker://...} pushes as is (with C{--preserve-digests}).  Layouts are cached
under C{cache_dir} in a directory named for a digest of the inputs (paths, sizes, mtimes, layer
kinds), so a second build with the same inputs costs one C{stat} per file.

    python -m dfly.devtools.image --cache DIR [--small]     # prints the layout's JSON summary
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

BUILDER_VERSION = "1"
MTIME = 1700000000  # 2023-11-14, fixed so that layers are reproducible
CREATED = "2023-11-14T22:13:20Z"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageError(RuntimeError):
    """The files an image is made of are missing, or the layout cannot be written."""


@dataclass(frozen=True)
class LayerSpec:
    """Files of one layer (absolute paths, stored without the leading slash)."""

    files: tuple[str, ...]
    compress: bool = True


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass
class Image:
    """An OCI layout on disk and what is in it."""

    layout: str
    tag: str
    manifest: Blob
    config: Blob
    layers: list[Blob] = field(default_factory=list)

    @property
    def blobs(self) -> list[Blob]:
        """Config and layers: what a registry serves from C{/v2/<name>/blobs/}."""
        return [self.config, *self.layers]

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    def blob_path(self, blob: Blob) -> str:
        return os.path.join(self.layout, "blobs", "sha256", blob.hex)

    def oci_ref(self) -> str:
        """The skopeo source for this image: C{oci:LAYOUT:TAG}."""
        return f"oci:{self.layout}:{self.tag}"

    def summary(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "tag": self.tag,
            "manifest": self.manifest.digest,
            "config": self.config.digest,
            "layers": [{"digest": b.digest, "size": b.size, "media_type": b.media_type} for b in self.layers],
            "blob_bytes": self.blob_bytes,
        }


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _HashingWriter:
    """A write-only file that hashes and counts what passes on to C{out} (if any)."""

    def __init__(self, out: _Sink | None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def _tar_layer(spec: LayerSpec, blobs_dir: str) -> tuple[Blob, str]:
    """Write one layer as a blob; return it and its diff_id (sha256 of the uncompressed tar)."""
    fd, tmp = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-")
    try:
        with os.fdopen(fd, "wb") as raw:
            blob_w = _HashingWriter(raw)
            gz: gzip.GzipFile | None = None
            tar_w = blob_w
            if spec.compress:
                gz = gzip.GzipFile(fileobj=blob_w, mode="wb", compresslevel=1, mtime=0)
                tar_w = _HashingWriter(gz)
            with tarfile.open(fileobj=tar_w, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for path in _with_parent_dirs(spec.files):
                    _add(tar, path)
            if gz is not None:
                gz.close()
            diff_id = "sha256:" + tar_w.sha.hexdigest()
        blob = Blob("sha256:" + blob_w.sha.hexdigest(), blob_w.size, MEDIA_LAYER_GZIP if spec.compress else MEDIA_LAYER)
        os.replace(tmp, os.path.join(blobs_dir, blob.hex))
        return blob, diff_id
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _with_parent_dirs(files: tuple[str, ...]) -> list[str]:
    """The files and every directory above them, sorted, so the tar unpacks anywhere."""
    names: set[str] = set()
    for path in files:
        names.add(path)
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            names.add(parent)
            parent = os.path.dirname(parent)
    return sorted(names)


def _add(tar: tarfile.TarFile, path: str) -> None:
    info = tarfile.TarInfo(path.lstrip("/"))
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if os.path.isdir(path) and not os.path.islink(path):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    st = os.stat(path)
    info.size = st.st_size
    info.mode = st.st_mode & 0o777
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _write_json_blob(obj: Any, blobs_dir: str, media_type: str) -> Blob:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    blob = Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), media_type)
    with open(os.path.join(blobs_dir, blob.hex), "wb") as f:
        f.write(data)
    return blob


def _inputs_key(layers: list[LayerSpec], tag: str) -> str:
    h = hashlib.sha256(f"{BUILDER_VERSION}\n{tag}\n".encode())
    for spec in layers:
        h.update(f"layer compress={spec.compress}\n".encode())
        for path in spec.files:
            try:
                st = os.stat(path)
            except OSError as e:
                raise ImageError(f"cannot read {path}: {e.strerror}") from e
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def build_image(cache_dir: str, layers: list[LayerSpec], tag: str = "latest") -> Image:
    """The OCI layout of an image with these layers (built, or found in the cache)."""
    if not layers:
        raise ImageError("an image needs at least one layer")
    key = _inputs_key(layers, tag)
    layout = os.path.join(os.path.abspath(cache_dir), f"oci-{key}")
    summary_path = os.path.join(layout, "dfly-image.json")
    if os.path.exists(summary_path):
        image = _load(layout, summary_path)
        if image is not None:
            return image
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=cache_dir, prefix=".building-")
    try:
        blobs_dir = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs_dir)
        built = [_tar_layer(spec, blobs_dir) for spec in layers]
        config = _write_json_blob(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": CREATED,
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in built]},
                "history": [{"created": CREATED, "created_by": f"dfly image builder layer {i}"} for i in range(len(built))],
            },
            blobs_dir,
            MEDIA_CONFIG,
        )
        manifest = _write_json_blob(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
                "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b, _ in built],
            },
            blobs_dir,
            MEDIA_MANIFEST,
        )
        with open(os.path.join(work, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        with open(os.path.join(work, "index.json"), "w") as f:
            json.dump(
                {
                    "schemaVersion": 2,
                    "manifests": [
                        {
                            "mediaType": MEDIA_MANIFEST,
                            "digest": manifest.digest,
                            "size": manifest.size,
                            "annotations": {"org.opencontainers.image.ref.name": tag},
                        }
                    ],
                },
                f,
            )
        image = Image(layout, tag, manifest, config, [b for b, _ in built])
        with open(os.path.join(work, "dfly-image.json"), "w") as f:
            json.dump(image.summary(), f)
        if os.path.exists(layout):
            shutil.rmtree(layout)
        os.rename(work, layout)
        return image
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _load(layout: str, summary_path: str) -> Image | None:
    """A cached layout, if its summary and every blob of the right size are there."""
    try:
        with open(summary_path) as f:
            s = json.load(f)
        manifest = Blob(s["manifest"], 0, MEDIA_MANIFEST)
        mpath = os.path.join(layout, "blobs", "sha256", manifest.hex)
        manifest = Blob(s["manifest"], os.path.getsize(mpath), MEDIA_MANIFEST)
        cpath = os.path.join(layout, "blobs", "sha256", s["config"].split(":", 1)[1])
        config = Blob(s["config"], os.path.getsize(cpath), MEDIA_CONFIG)
        layers = [Blob(x["digest"], int(x["size"]), x["media_type"]) for x in s["layers"]]
        image = Image(layout, s["tag"], manifest, config, layers)
        for b in layers:
            if os.path.getsize(image.blob_path(b)) != b.size:
                return None
        return image
    except (OSError, KeyError, ValueError, TypeError):
        return None


# -- the images the tests use ----------------------------------------------


def _files_under(directory: str, limit_bytes: int, limit_files: int = 400) -> tuple[str, ...]:
    """Regular files under C{directory} (sorted walk), up to a total size and count."""
    out: list[str] = []
    total = 0
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if total + size > limit_bytes:
                continue
            out.append(path)
            total += size
            if len(out) >= limit_files:
                return tuple(out)
    if not out:
        raise ImageError(f"no readable files under {directory}")
    return tuple(out)


def big_library() -> str:
    """A big real file for the large layer: the LLVM 15 shared library (about 117 MB)."""
    found = sorted(glob.glob("/usr/lib/*/libLLVM-15.so.1"))
    if not found:
        raise ImageError("libLLVM-15.so.1 is not installed (Debian package libllvm15)")
    return found[0]


def standard_image(cache_dir: str) -> Image:
    """Three layers: licence texts (gzip), package docs (gzip), libLLVM (plain, about 117 MB)."""
    layers = [
        LayerSpec(_files_under("/usr/share/common-licenses", 2 << 20)),
        LayerSpec(_files_under("/usr/share/doc", 4 << 20)),
        LayerSpec((big_library(),), compress=False),
    ]
    return build_image(cache_dir, layers, tag="v1")


def small_image(cache_dir: str) -> Image:
    """Two small layers (licence texts; the json package's sources): for auth tests."""
    layers = [
        LayerSpec(_files_under("/usr/share/common-licenses", 1 << 20)),
        LayerSpec(_files_under(os.path.dirname(json.__file__), 1 << 20), compress=False),
    ]
    return build_image(cache_dir, layers, tag="v1")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="build (or find in the cache) an OCI image layout of real files")
    p.add_argument("--cache", required=True, help="cache directory for layouts")
    p.add_argument("--small", action="store_true", help="the small two-layer image")
    a = p.parse_args(argv)
    try:
        image = small_image(a.cache) if a.small else standard_image(a.cache)
    except ImageError as e:
        print(f"image: {e}", file=sys.stderr)
        return 1
    print(json.dumps(image.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
