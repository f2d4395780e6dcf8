"""Running one step of the network over a batch, a chunk at a time: the chunks sized by a
memory budget, and three ways to run them (numpy z-score on the host; tensors already on the
device; host input z-scored on the device, pipelined through pinned buffers on CUDA). Outputs
that are not finite are an :class:`InputError` naming the particles.

On a CPU with ``torch.get_num_threads()`` = P > 1 the chunks run side by side on P threads of
the engine's own, each with one PyTorch thread (:class:`CpuPool`), rather than one chunk at a
time with P OpenMP threads per operation: most of a reconstruction is many small operations
whose OpenMP joins cost more than they share (docs/benchmarks.md, issue #26), and a core taken
by another process stalls every join. A chunk's numbers then do not depend on P: every chunk is
computed on one thread. (Which chunk a particle falls in does move its numbers at float32
rounding, as the batch it comes in does.)

:class:`ChunkedRunner` is the base of :class:`cryolens.engine.Engine`, which sets what it reads:
``device``, ``config``, ``memory_budget``, ``max_chunk``, ``exact_zscore``, ``allow_tf32`` and
``box_shape``.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
import torch

from cryolens.checked import float32
from cryolens.devices import full_float32
from cryolens.errors import InputError
from cryolens.inputs import checked_batch, host_array, host_batch, tensor_batch
from cryolens.model.render import fused_precision
from cryolens.zscore import zscore, zscore_tensor

#: Numpy batches on CUDA are split in at least two chunks down to this size: one chunk leaves
#: nothing to overlap (H200, batch 512: one chunk 12,000/s, two 16,300/s).
MIN_PIPELINE_CHUNK = 128
#: Host dtypes torch can read directly (converted to float32 while copying to pinned memory).
_TORCH_HOST_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "int16",
                                             "int32", "int64", "uint8")}


class ChunkedRunner:
    """The chunking and running half of the engine (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the pinned buffers, streams and thread below
        self._pinned: dict[str, torch.Tensor] = {}
        self._streams: tuple | None = None
        self._copier: ThreadPoolExecutor | None = None  # pinned -> numpy outputs, on CUDA
        self._cpu_pool: CpuPool | None = None  # started at the first CPU batch that uses it

    # -- chunking -------------------------------------------------------------------------
    def _bytes_per_particle(self, n_render: int, n_outputs: int = 1, renders: int = 1) -> int:
        cfg = self.config
        # The cuBLAS renderer's largest temporary, its planes; the fused kernel builds them in
        # registers from the three profiles (and their temporaries), six (N, n) arrays.
        if fused_precision(self.device) is not None:
            planes = 6 * cfg.n_splats * n_render
        else:
            planes = cfg.n_splats * n_render * n_render
        # each render, then its spectrum (complex) and output; segments make three renders
        volumes = (2 + 4 * renders) * n_render**3
        encoder = 2 * 8 * (cfg.box_size // 2) ** 3
        total = 4 * (planes + volumes + encoder)
        if not self.exact_zscore:
            # z-score temporaries (float32 in and out), and the next chunk's input and the
            # previous chunk's outputs, in flight while this one computes.
            box = cfg.box_size**3
            total += 4 * box * (3 + n_outputs)
        return total

    def _chunks(self, n: int, n_render: int, n_outputs: int = 1, *, pipelined: bool = False,
                workers: int = 1, renders: int = 1) -> Iterator[slice]:
        per_particle = self._bytes_per_particle(n_render, n_outputs, renders)
        # ``workers`` chunks are in memory at once
        size = max(1, min(self.max_chunk, self.memory_budget // (per_particle * workers)))
        if pipelined:  # two chunks at least, so that copying one overlaps computing the other
            size = min(size, max(-(-n // 2), MIN_PIPELINE_CHUNK))
        # as many chunks as that size needs, rounded up to a multiple of the workers (each
        # gets work), all of one size give or take one particle
        count = min(n, workers * -(-n // (workers * size)))
        for i in range(count):
            yield slice(i * n // count, (i + 1) * n // count)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    # -- running a batch --------------------------------------------------------------------
    def _run(self, volumes, n_render: int, n_outputs: int, step, renders: int = 1
             ) -> tuple[dict, torch.device | None]:
        """Run ``step(normalised, mean, std) -> {name: (n, ...) tensor}`` over every chunk.

        Returns the outputs, whole-batch, as numpy arrays (numpy input) or as tensors on the
        input's device (tensor input), and that device (None for numpy).
        """
        place = volumes.device if isinstance(volumes, torch.Tensor) else None
        no_tf32 = self.device.type == "cuda" and not self.allow_tf32
        with torch.inference_mode(), full_float32() if no_tf32 else contextlib.nullcontext():
            bad = None
            if not self.exact_zscore:
                if place is not None and place.type == self.device.type:
                    outs, flags = self._run_on_device(tensor_batch(volumes, self.box_shape),
                                                      n_render, n_outputs, step, renders)
                else:
                    host = (host_array(tensor_batch(volumes, self.box_shape)) if place is not None
                            else host_batch(volumes, self.box_shape))
                    with self._lock:
                        outs, flags = self._run_pipelined(host, n_render, n_outputs, step,
                                                          renders)
                bad = _read_flags(flags)
            if bad is None or bad.pop("stats"):
                # Input that is not finite (checked there), or statistics beyond float32's
                # range: again, z-scored on the host with numpy (float64 where needed).
                outs, flags = self._run_exact(checked_batch(volumes, self.box_shape),
                                              n_render, n_outputs, step, renders)
                bad = _read_flags(flags)
        self._raise_if_not_finite(bad, outs)
        if place is not None:
            outs = {k: _to(v, place) for k, v in outs.items()}
        return outs, place

    def _run_exact(self, batch: np.ndarray, n_render, n_outputs, step, renders=1):
        """Checked host input, converted to float32 and z-scored with numpy a chunk at a time
        (a batch of another dtype is never copied whole: the request's body and the outputs
        are the only arrays the size of the batch)."""
        outs: dict[str, np.ndarray] = {}
        allocate = threading.Lock()

        def run(part: slice) -> None:
            norm = zscore(float32(batch[part]))
            results = step(self._tensor(norm.volumes), self._tensor(norm.mean),
                           self._tensor(norm.std))
            for key, value in results.items():
                with allocate:
                    if key not in outs:
                        outs[key] = np.empty((len(batch), *value.shape[1:]), np.float32)
                outs[key][part] = host_numpy(value)

        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        parts = list(self._chunks(len(batch), n_render, n_outputs, workers=workers,
                                  renders=renders))
        if workers > 1:
            key = (workers, _thread_nice())  # the pool's threads inherit their starter's nice
            with self._lock:
                if self._cpu_pool is None or self._cpu_pool.key != key:
                    # the one it replaces may still be running a caller's chunks: its threads
                    # end when that caller lets go of it (the executor is then collected)
                    self._cpu_pool = CpuPool(key)
                pool = self._cpu_pool
            pool.run(run, parts)
        else:
            for part in parts:
                run(part)
        # Checked on the host afterwards: cheaper than a dozen small torch ops per chunk.
        return outs, {k: np.bool_(not np.isfinite(v).all()) for k, v in outs.items()}

    def _run_on_device(self, volumes: torch.Tensor, n_render, n_outputs, step, renders=1):
        """Tensor input already on the engine's (non-CPU) device: no host transfer at all."""
        outs: dict[str, torch.Tensor] = {}
        flags: dict[str, torch.Tensor] = {}
        for part in self._chunks(len(volumes), n_render, n_outputs, renders=renders):
            x, mean, std = zscore_tensor(volumes[part].to(self.device, torch.float32))
            _flag(flags, "stats", std)
            results = step(x, mean, std)
            for key, value in results.items():
                _flag(flags, key, value)
                if key not in outs:
                    with torch.inference_mode(False):  # a tensor callers may modify in place
                        outs[key] = torch.empty((len(volumes), *value.shape[1:]),
                                                dtype=torch.float32, device=self.device)
                outs[key][part] = value
        return outs, flags

    def _run_pipelined(self, host: np.ndarray, n_render, n_outputs, step, renders=1):
        """Host input, z-scored on the device; on CUDA a pipeline per chunk: host -> pinned ->
        device on one stream, compute on the current stream, device -> pinned on a third, then
        pinned -> the preallocated numpy outputs on a thread of the engine's own. Two pinned
        slots each way: while chunk k computes, chunk k+1 is copied into pinned memory here
        and chunk k-1 out of it there."""
        cuda = self.device.type == "cuda"
        if host.dtype not in _TORCH_HOST_DTYPES or not host.flags.c_contiguous:
            with np.errstate(over="ignore"):  # beyond float32 range: inf, caught as input
                host = np.ascontiguousarray(host, dtype=np.float32)
        if cuda:
            if self._streams is None:
                self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
                self._copier = ThreadPoolExecutor(1, thread_name_prefix="cryolens-copy-out")
            copy_in, copy_out = self._streams
            compute = torch.cuda.current_stream(self.device)
        else:
            copy_in = copy_out = compute = None
        n = len(host)
        chunks = list(self._chunks(n, n_render, n_outputs, pipelined=cuda, renders=renders))
        size = max(part.stop - part.start for part in chunks)  # they differ by one at most
        pin_in = self._staging("in", (2, size, *self.box_shape))
        source = torch.from_numpy(host) if host.flags.writeable else _readonly_tensor(host)
        outs: dict[str, np.ndarray] = {}
        flags: dict[str, torch.Tensor] = {}
        pin_out: dict[str, torch.Tensor] = {}
        in_free = [None, None]  # events: the H2D copy from that pinned slot has finished
        copied: list[Future | None] = [None, None]  # that slot's copy into the numpy outputs

        def copy_to_outputs(part: slice, slot: int, ready, staged: list) -> None:
            _wait(ready)  # the D2H copy into the slot has finished
            with torch.inference_mode():
                for key, buffer in staged:
                    torch.from_numpy(outs[key][part]).copy_(buffer[slot, : part.stop - part.start])

        try:
            for i, part in enumerate(chunks):
                slot, m = i % 2, part.stop - part.start
                _wait(in_free[slot])
                pin_in[slot, :m].copy_(source[part])  # converts dtype; multi-threaded
                with _on(copy_in):
                    x = pin_in[slot, :m].to(self.device, non_blocking=True)
                    in_free[slot] = _record(copy_in)
                if cuda:
                    compute.wait_event(in_free[slot])
                    x.record_stream(compute)
                x, mean, std = zscore_tensor(x)
                _flag(flags, "stats", std)
                results = step(x, mean, std)
                for key, value in results.items():
                    _flag(flags, key, value)
                done = _record(compute)
                _result(copied[slot])  # chunk k-2 has left this slot's pinned buffers
                with _on(copy_out):
                    if cuda:
                        copy_out.wait_event(done)
                    for key, value in results.items():
                        if key not in outs:
                            outs[key] = np.empty((n, *value.shape[1:]), np.float32)
                            pin_out[key] = self._staging(f"out:{key}",
                                                         (2, size, *value.shape[1:]))
                        pin_out[key][slot, :m].copy_(value, non_blocking=True)
                        if cuda:
                            value.record_stream(copy_out)
                    ready = _record(copy_out)
                staged = list(pin_out.items())
                if cuda:
                    copied[slot] = self._copier.submit(copy_to_outputs, part, slot, ready, staged)
                else:  # every step above has run: nothing to overlap
                    copy_to_outputs(part, slot, ready, staged)
            for future in copied:
                _result(future)
        finally:  # after an error too: no copy may still read the pinned buffers
            futures_wait([f for f in copied if f is not None and not f.cancel()])
        return outs, flags

    def _staging(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 host buffer of ``shape``, pinned on CUDA, kept and reused between calls
        (grown when a larger one is needed)."""
        numel = int(np.prod(shape))
        buffer = self._pinned.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32,
                                 pin_memory=self.device.type == "cuda")
            self._pinned[name] = buffer
        return buffer[:numel].view(shape)

    def _raise_if_not_finite(self, bad: dict[str, bool], outs: dict) -> None:
        """Any output that is not finite: an InputError naming the particles, never a NaN or
        infinity handed back. ``bad``: each output's flag, which may be a false alarm (a sum
        beyond float32's range), so the flagged outputs are checked element by element."""
        for key, is_bad in bad.items():
            if not is_bad:
                continue
            value = outs[key]
            finite = (np.isfinite(value) if isinstance(value, np.ndarray)
                      else torch.isfinite(value).cpu().numpy())
            rows = np.flatnonzero(~finite.reshape(len(finite), -1).all(axis=1)).tolist()
            if not rows:
                continue
            hint = (" De-normalising (x * std + mean) left float32's range: the particle's "
                    "values are too large for it. Divide them by a constant (each particle is "
                    "z-scored, so its scale does not change the model's result), or in Python "
                    "ask for normalised units (denormalise=False)."
                    if key.endswith("reconstruction") else "")
            raise InputError(
                f"the {key} of particle(s) {rows[:10]} is not finite (NaN or infinity).{hint}",
                field="volumes",
            )


class CpuPool:
    """``size`` threads, each running PyTorch with one thread of its own, for the chunks of a
    CPU batch (see the module's docstring); ``key`` is (size, the starting thread's nice).

    ``torch.set_num_threads`` is per thread for PyTorch's own kernels but also moves the
    process's default, so the pool starts all its threads at once and gives the caller's
    setting back before any chunk runs. The threads are started by the first caller, whose
    scheduling priority they inherit (the server's model thread runs below its event loop).
    """

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.size = key[0]
        self._executor: ThreadPoolExecutor | None = None
        self._starting = threading.Lock()

    def run(self, work, parts: list) -> None:
        """``work(part)`` for every part, in inference mode, on the pool's threads; the first
        error is raised once every part has finished."""
        with self._starting:
            if self._executor is None:
                self._start()
        futures = [self._executor.submit(_inference, work, part) for part in parts]
        futures_wait(futures)
        for future in futures:
            future.result()

    def _start(self) -> None:
        threads = torch.get_num_threads()
        started = threading.Barrier(self.size + 1)

        def one_thread() -> None:
            # PyTorch sets a thread's count from the process default when the thread first
            # asks for it; asked here, while that default is 1, the thread keeps 1 for good.
            torch.set_num_threads(1)
            torch.get_num_threads()
            started.wait()

        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="cryolens-cpu",
                                            initializer=one_thread)
        for _ in range(self.size):  # each submit starts a thread until there are ``size``
            self._executor.submit(int)
        started.wait()
        torch.set_num_threads(threads)


def _thread_nice() -> int:
    """The calling thread's nice value (Linux keeps one per thread), 0 where unknown."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0


def _inference(work, part) -> None:
    with torch.inference_mode():  # inference mode is per thread
        work(part)


def host_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _to(value, place: torch.device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(place)
    return value.to(place)


def _flag(flags: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Accumulate, on the device and without a sync, whether ``value`` may have an entry that is
    not finite: its sum is not (one fused reduction; a sum that overflows is a false alarm,
    which :meth:`ChunkedRunner._raise_if_not_finite` tells apart)."""
    bad = ~torch.isfinite(value.sum())
    flags[key] = bad if key not in flags else flags[key] | bad


def _read_flags(flags: dict) -> dict[str, bool]:
    """The flags as bools: one host sync for all of them (numpy ones are read as they are)."""
    names = list(flags)
    if all(isinstance(flag, np.bool_) for flag in flags.values()):
        return {k: bool(flags[k]) for k in names}
    return dict(zip(names, torch.stack([flags[k] for k in names]).cpu().tolist(), strict=True))


_FLOAT32_LOCK = threading.Lock()
_float32_users = 0


def _result(future: Future | None) -> None:
    if future is not None:
        future.result()


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    return stream.record_event() if stream is not None else None


def _wait(event) -> None:
    if event is not None:
        event.synchronize()


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of a read-only array (only ever read here), without torch's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
