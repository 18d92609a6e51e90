"""The compression hook: an attention function that wraps the model's own backend.

We register ``kvbench_<backend>`` (sdpa, eager, flash_attention_2) in transformers'
attention interface, so any model whose attention calls the interface (Llama,
Mistral, Qwen2, ... ) gets the hook without copying modeling code. What it does
depends on the session active on the attention module:

* a `PrefillSession` (one sample's prompt, batch 1): the real backend runs, then the
  layer's post-RoPE queries and un-repeated keys/values go to each of the sample's
  compression states (one per configuration of a grid: every method compresses a layer
  after that layer's full attention, so they all see the same tensors), and only what
  each keeps is stored, before the next layer runs: the full cache of all layers never
  coexists. In the scoring pre-pass the layer is only observed.
* a `DecodeSession` (one token for each row of a decode batch): the keys and values are
  pages of the batch's pool, where each layer and row holds its own number of valid slots;
  attention runs over the valid slots only (on CUDA by the paged Triton kernel
  `kvbench.engine.invariant_kernels.decode_attention`, on the CPU by `masked_decode_attention`
  over the row's pages in slot order).
* an `ExtendSession` (several new tokens over one sample's compressed cache, batch 1: the
  question of a question-agnostic run, `kvbench.engine.extend`): the keys and values are
  the layer's kept entries followed by the new tokens' own; each new token attends to all
  the kept entries and causally to the new tokens (`extend_attention`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Eager attention has no entry in the interface; Llama's is the generic one (repeat KV, softmax in fp32)
# that Mistral and Qwen2 share.
from transformers.models.llama.modeling_llama import eager_attention_forward

from kvbench.methods.base import LayerPrefill, SampleCompression, Selection

BACKENDS = ("sdpa", "eager", "flash_attention_2")
HOOKED_PREFIX = "kvbench_"


@dataclass
class PrefillSession:
    """One sample's prefill: each layer is shown to every compression state, and what each keeps is collected."""

    #: the sample's compression state of each configuration sharing the prefill
    samples: list[SampleCompression]
    num_layers: int
    #: scoring pre-pass: show each layer to ``observe`` of the states that need it and keep nothing
    observing: bool = False
    #: per configuration, per layer, the stored (keys, values), each (1, num_kv_heads, kept, head_dim)
    kept: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=list)
    #: called after each layer's compression (the decode batch launches its next step there, so that decoding
    #: overlaps the prefill on the device)
    between_layers: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.kept = [[None] * self.num_layers for _ in self.samples]

    def on_prefill(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        layer = LayerPrefill(module.layer_idx, self.num_layers, query, key, value, scaling)
        if self.observing:
            for sample in self.samples:
                if sample.needs_scoring_pass:
                    sample.observe(layer)
        else:
            selections = [sample.select(layer) for sample in self.samples]
            for kept, stored in zip(self.kept, stored_entries(key, value, selections)):
                kept[layer.layer_idx] = stored
        if self.between_layers is not None:
            self.between_layers()


def stored_entries(key: torch.Tensor, value: torch.Tensor, selections: list[Selection | None]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) each configuration stores of a layer: all of them without a selection, a merging method's
    own tensors, else the entries at its indices. The configurations that only choose positions are gathered in one
    gather each for keys and values (a grid runs dozens a layer: launches, not bytes, are their cost on CUDA), each
    configuration's entries a slice of the result, so they are freed together when the last of them is."""
    stored: list[tuple[torch.Tensor, torch.Tensor] | None] = [
        (key, value) if selection is None else
        (selection.keys, selection.values) if selection.keys is not None else None
        for selection in selections]
    chosen = [selection.indices for selection in selections if selection is not None and selection.keys is None]
    if chosen:
        indices = chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)
        gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1])
        sizes = [positions.shape[-1] for positions in chosen]
        pieces = zip(key.gather(2, gather_index).split(sizes, dim=2), value.gather(2, gather_index).split(sizes, dim=2))
        stored = [entry if entry is not None else next(pieces) for entry in stored]
    return stored


@dataclass
class DecodeSession:
    """A decode step over the first rows of a decode batch (`kvbench.engine.decode`), whose keys and values lie in
    pages of a pool: each row's slot ``s`` is in page ``page_table[row, s // page]`` at offset ``s % page``."""

    #: per layer, the (pages, num_kv_heads, page, head_dim) key and value pools
    key_pages: list[torch.Tensor]
    value_pages: list[torch.Tensor]
    #: (num_layers, pages, page) bool: which slots may be attended to
    valid: torch.Tensor
    #: (rows, entries) each row's pages in slot order
    page_table: torch.Tensor
    #: (num_layers, rows) the slot each row writes this step; no valid slot lies after it
    write_pos: torch.Tensor
    #: (num_layers, rows) that slot's page and offset in it
    write_pages: torch.Tensor
    write_offsets: torch.Tensor
    #: the batch-invariant step (`kvbench.engine.invariant`)
    batch_invariant: bool = False

    @functools.cached_property
    def longest_first(self) -> torch.Tensor:
        """(num_layers, rows) the paged kernel's launch order (`rows_longest_first`), made once a step for every
        layer, by the first layer that asks."""
        from kvbench.engine.invariant_kernels import rows_longest_first

        return rows_longest_first(self.write_pos)

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, true: torch.Tensor) -> None:
        """Store each row's new key and value (rows, kv_heads, 1, d) at its write position and mark the slot valid
        (``true``: a device tensor, so a CUDA graph copies no host value)."""
        page, offset = self.write_pages[layer], self.write_offsets[layer]
        self.key_pages[layer][page, :, offset] = key_states[:, :, 0]
        self.value_pages[layer][page, :, offset] = value_states[:, :, 0]
        self.valid[layer, page, offset] = true

    def attention(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Each row's query (rows, Hq, 1, d) over its valid slots: (rows, 1, Hq, d). On CUDA (and in a
        batch-invariant step anywhere) by the paged Triton kernel, which reads the pages in place; on the CPU
        by SDPA over the rows' pages gathered in slot order."""
        if self.batch_invariant or query.is_cuda:
            from kvbench.engine.invariant_kernels import decode_attention

            return decode_attention(query, self.key_pages[layer], self.value_pages[layer], self.valid[layer],
                                    self.page_table, self.write_pos[layer], scaling, self.longest_first[layer])
        page = self.key_pages[layer].shape[2]
        # each row's table entries up to its own write position (no valid slot lies beyond it); rows of similar
        # length gather together, so that a full-cache row does not make every compressed row gather its length
        entries = (self.write_pos[layer] // page + 1).tolist()
        groups = _similar_lengths(entries)
        if len(groups) == 1:
            return self._gathered_attention(layer, query, self.page_table, max(entries), scaling)
        output = query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])
        for rows in groups:
            index = torch.tensor(rows, device=query.device)
            output[index] = self._gathered_attention(layer, query[index], self.page_table[index],
                                                     max(entries[row] for row in rows), scaling)
        return output

    def _gathered_attention(self, layer: int, query: torch.Tensor, table: torch.Tensor, entries: int,
                            scaling: float) -> torch.Tensor:
        """SDPA over the first ``entries`` pages of each of ``table``'s rows, gathered in slot order (one copy:
        heads first, so the gather lays each head's slots out contiguously)."""
        _, kv_heads, page, head_dim = self.key_pages[layer].shape
        table = table[:, :entries]
        rows = table.shape[0]

        def in_slot_order(pages: torch.Tensor) -> torch.Tensor:
            return pages.transpose(0, 1)[:, table].view(kv_heads, rows, entries * page, head_dim).transpose(0, 1)

        valid = self.valid[layer][table].view(rows, entries * page)
        return masked_decode_attention(query, in_slot_order(self.key_pages[layer]),
                                       in_slot_order(self.value_pages[layer]), valid, scaling)


def _similar_lengths(entries: list[int]) -> list[list[int]]:
    """The rows grouped by length: longest first, a row joins the current group while it is more than half the
    group's longest (so no row gathers more than twice its own pages, and mixed batches make few groups)."""
    groups: list[list[int]] = []
    for row in sorted(range(len(entries)), key=lambda row: -entries[row]):
        if groups and 2 * entries[row] > entries[groups[-1][0]]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def masked_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query per row over the row's valid slots: (batch, 1, num_heads, head_dim), as backends return.

    query (B, Hq, 1, d); key/value (B, Hkv, S, d) un-repeated; valid (B, S). Under GQA the
    query heads of a KV head are laid out as that head's queries, so no key is repeated.
    A row's slot order plays no part: keys are post-RoPE, so attention is a sum over the set
    of valid slots (which is what lets eviction clear a slot instead of shifting the cache).
    """
    batch, num_heads, _, head_dim = query.shape
    num_kv_heads = key.shape[1]
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = valid[:, None, None, :]
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, num_heads, 1, head_dim).transpose(1, 2)


class ExtendSession:
    """New tokens prefilled over a compressed cache: each layer's last keys (as many as the queries) are theirs."""


def extend_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """The last ``n`` keys are the queries' own tokens: each query attends to every earlier key and causally to
    those ``n``. query (1, Hq, n, d); key/value (1, Hkv, kept + n, d) un-repeated; returns (1, n, Hq, d).

    Each KV head's query heads are laid out as ``groups * n`` queries of that head, so no key is repeated.
    """
    _, num_heads, new_tokens, head_dim = query.shape
    num_kv_heads, key_length = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    grouped = query.reshape(1, num_kv_heads, groups * new_tokens, head_dim)
    query_position = torch.arange(new_tokens, device=query.device) + (key_length - new_tokens)
    mask = torch.arange(key_length, device=query.device) <= query_position[:, None]
    mask = mask.repeat(groups, 1)
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(1, num_heads, new_tokens, head_dim).transpose(1, 2)


def _hooked(backend_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        session = getattr(module, "kvbench_session", None)
        scaling = kwargs.get("scaling") or module.scaling
        if isinstance(session, DecodeSession):  # the step's keys and values are in the batch's pages
            return session.attention(module.layer_idx, query, scaling), None
        if isinstance(session, ExtendSession):
            return extend_attention(query, key, value, scaling), None
        backend = eager_attention_forward if backend_name == "eager" else ALL_ATTENTION_FUNCTIONS[backend_name]
        output = backend(module, query, key, value, attention_mask, **kwargs)
        if isinstance(session, PrefillSession) and query.shape[2] == key.shape[2] > 1:
            session.on_prefill(module, query, key, value, scaling)
        return output

    attention.__name__ = f"{HOOKED_PREFIX}{backend_name}"
    return attention


for _backend in BACKENDS:
    AttentionInterface.register(f"{HOOKED_PREFIX}{_backend}", _hooked(_backend))
    AttentionMaskInterface.register(f"{HOOKED_PREFIX}{_backend}", ALL_MASK_ATTENTION_FUNCTIONS[_backend])


def install_hook(model) -> None:
    """Route the model's attention through the hook (a no-op wrapper while no session is active)."""
    backend = model.config._attn_implementation
    if backend.startswith(HOOKED_PREFIX):
        return
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not supported by the kvbench hook ({', '.join(BACKENDS)})")
    model.set_attn_implementation(f"{HOOKED_PREFIX}{backend}")


def cache_keyword(model) -> str:
    """The keyword the model's forward takes a cache object by: transformers renamed ``past_key_values`` to
    ``cache`` within the 5.x series; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules that call the attention interface: those with a ``layer_idx`` and a ``scaling`` (found once)."""
    found = getattr(model, "_kvbench_attention_modules", None)
    if found is None:
        found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
        model._kvbench_attention_modules = found
    return found


@contextlib.contextmanager
def active(model, session: PrefillSession | DecodeSession | ExtendSession):
    """Make ``session`` active on every attention module for the duration of a forward pass, then what was active
    before (a decode step may run inside a prefill's forward, between its layers)."""
    modules = attention_modules(model)
    before = [getattr(module, "kvbench_session", None) for module in modules]
    for module in modules:
        module.kvbench_session = session
    try:
        yield session
    finally:
        for module, previous in zip(modules, before):
            module.kvbench_session = previous
