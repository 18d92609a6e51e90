"""Driving a method by hand as the engine does: bind it to a model, start a sample, watch its evictions."""

from kvbench.methods.base import Compressor, Method, ModelInfo, SampleCompression


def sample_state(method: Method, prompt_length: int, num_layers: int = 1, model_name: str = "tiny",
                 sample: dict | None = None) -> SampleCompression:
    """The per-sample state the engine would make for ``method`` on a ``num_layers``-layer model."""
    return method.prepare(ModelInfo(model_name, num_layers)).start_sample(prompt_length, sample)


class RecordingCompressor(Compressor):
    """Wraps a compressor: keeps the last sample state it made and every decode-time eviction it answered."""

    def __init__(self, inner: Compressor):
        super().__init__(inner.method, inner.model)
        self.inner = inner
        self.last_sample: SampleCompression | None = None
        #: (layer_idx, cache_length, tokens_seen, evicted index or None)
        self.evictions: list[tuple[int, int, int, int | None]] = []

    def identity(self):
        return self.inner.identity()

    def start_sample(self, prompt_length, sample=None):
        state = self.inner.start_sample(prompt_length, sample)
        answer = state.decode_eviction

        def recording(layer_idx, cache_length, tokens_seen):
            index = answer(layer_idx, cache_length, tokens_seen)
            self.evictions.append((layer_idx, cache_length, tokens_seen, index))
            return index

        state.decode_eviction = recording
        self.last_sample = state
        return state


def recording(method: Method, num_layers: int, model_name: str = "tiny") -> RecordingCompressor:
    return RecordingCompressor(method.prepare(ModelInfo(model_name, num_layers)))
