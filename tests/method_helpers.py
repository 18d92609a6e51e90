"""Driving a method by hand as the engine does: bind it to a model, start a sample, watch what it keeps and evicts."""

import contextlib

from kvbench.methods.base import Compressor, LayerPrefill, Method, ModelInfo, SampleCompression, Selection


def sample_state(method: Method, prompt_length: int, num_layers: int = 1, sample: dict | None = None) -> SampleCompression:
    """The per-sample state the engine would make for ``method`` on a ``num_layers``-layer model."""
    return method.prepare(ModelInfo("tiny", num_layers)).start_sample(prompt_length, sample)


class RecordingCompressor(Compressor):
    """Wraps a compressor: keeps the last sample state it made, what each layer's prefill selected (and, with
    ``keep_layers``, the layer it was shown), and every decode-time eviction it answered."""

    def __init__(self, inner: Compressor, keep_layers: bool = False):
        super().__init__(inner.method, inner.model)
        self.inner = inner
        self.keep_layers = keep_layers
        self.last_sample: SampleCompression | None = None
        #: layer_idx -> the last sample's selection of that layer (None: kept whole)
        self.selections: dict[int, Selection | None] = {}
        #: layer_idx -> the last sample's prefill of that layer (with ``keep_layers``)
        self.layers: dict[int, LayerPrefill] = {}
        #: (layer_idx, cache_length, tokens_seen, evicted index or None)
        self.evictions: list[tuple[int, int, int, int | None]] = []

    def identity(self):
        return self.inner.identity()

    def start_sample(self, prompt_length, sample=None):
        state = self.inner.start_sample(prompt_length, sample)
        answer, select = state.decode_eviction, state.select

        def recording_select(layer):
            selection = select(layer)
            self.selections[layer.layer_idx] = selection
            if self.keep_layers:
                self.layers[layer.layer_idx] = layer
            return selection

        def recording(layer_idx, cache_length, tokens_seen):
            index = answer(layer_idx, cache_length, tokens_seen)
            self.evictions.append((layer_idx, cache_length, tokens_seen, index))
            return index

        state.decode_eviction = recording
        state.select = recording_select
        self.last_sample = state
        return state


def recording(method: Method, num_layers: int) -> RecordingCompressor:
    return RecordingCompressor(method.prepare(ModelInfo("tiny", num_layers)))


@contextlib.contextmanager
def recording_graph_captures():
    """The row counts of every CUDA graph the decode step captures inside the block (a list, filled as it goes).
    A capture that fails fails the block: the batch would quietly decode eagerly, and graphed tokens would then
    equal eager ones trivially."""
    from kvbench.engine import decode as decode_module

    captured, failures = [], []
    real_capture = decode_module.DecodeBatch._capture

    def counting_capture(batch, rows):
        try:
            graph = real_capture(batch, rows)
        except Exception as error:
            failures.append(f"{rows} rows: {error}")
            raise
        captured.append(rows)
        return graph

    decode_module.DecodeBatch._capture = counting_capture
    try:
        yield captured
    finally:
        decode_module.DecodeBatch._capture = real_capture
    assert not failures, f"CUDA graph capture failed ({'; '.join(failures)})"


@contextlib.contextmanager
def crash_at_row(number: int):
    """Inside the block the run loop raises RuntimeError("simulated crash") instead of building its ``number``-th
    result row (counting from 1): the rows before it have landed, as after a kill."""
    from kvbench.harness import run as run_module

    real_row = run_module._sample_row
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise RuntimeError("simulated crash")
        return real_row(*args, **kwargs)

    run_module._sample_row = failing
    try:
        yield
    finally:
        run_module._sample_row = real_row
