"""The batch-invariant kernels and decode mode, checked on any device (shared by the CPU tests under Triton's
interpreter, tests/interpret_batch_invariant.py, and the CUDA tests in tests/test_batch_invariant.py).

Each kernel is compared with the PyTorch computation done in float64 on the same (rounded) inputs, within a
bound derived from the kernel's arithmetic: float32 sums of n terms err by at most n units of float32
(2^-23 each, chopping as tensor cores may, where a rounded sum would need half), an approximate exp2 or
rsqrt by 2^-21 relative, and each rounding to the tensors' dtype by its unit roundoff u (2^-8 bfloat16,
2^-11 float16, 2^-24 float32). The invariance itself is bitwise: a row's result is the same in batches of
1, 3 and 8 rows (and more rows than one tile holds), at any position in the batch, and wherever its pages lie
in a pool of any size; slots past a row's write position hold NaN, which the kernel never reads.
"""

import contextlib

import torch
from tiny_models import random_prompt, tiny_model

from kvbench.engine.decode import PAGE_SLOTS, DecodeBatch
from kvbench.engine.generate import as_compressor, generate_stream
from kvbench.engine.invariant_kernels import (LARGE_TILES, LARGE_TILES_FROM_ROWS, LINEAR_TILES, decode_attention,
                                              invariant_linear, invariant_rms_norm, rows_longest_first)
from kvbench.engine.prefill import DecodeRequest
from kvbench.methods import build_method

F32 = 2.0**-23  # one float32 addition, chopped
APPROX = 2.0**-21  # exp2 / rsqrt approximations
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _randn(generator, *shape, dtype, device, scale=1.0):
    return (scale * torch.randn(*shape, generator=generator)).to(device=device, dtype=dtype)


# -- linear ------------------------------------------------------------------------------------------


def linear_excess(x, weight, bias) -> float:
    """The kernel's largest error over its bound (at most 1 where it holds)."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), weight.double()
    b64 = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=x.device)
    reference = x64 @ w64.T + b64
    magnitude = x64.abs() @ w64.abs().T + b64.abs()
    # the float32 accumulation over K products and the bias, then one rounding to the output dtype
    accumulated = (x.shape[-1] + 1) * F32 * magnitude
    bound = accumulated + unit_roundoff(x.dtype) * (reference.abs() + accumulated)
    result = invariant_linear(x, weight, bias).double().reshape(reference.shape)
    return ((result - reference).abs() / bound.clamp_min(1e-300)).max().item()


def linear_checks(device: str) -> tuple[dict, dict]:
    """({case: error over bound}, {case: whether every row equals itself computed in other batches})."""
    generator = torch.Generator().manual_seed(0)
    excess, invariant = {}, {}
    # K not a multiple of the reduced tile; N not a multiple of the output tile; more rows than a row tile
    rows_in_tiles = 2 * LINEAR_TILES.rows + 5
    for dtype in DTYPES:
        for reduced, outputs, with_bias in ((100, 70, True), (2 * LINEAR_TILES.reduced + 3, 33, False)):
            x = _randn(generator, rows_in_tiles, reduced, dtype=dtype, device=device)
            weight = _randn(generator, outputs, reduced, dtype=dtype, device=device, scale=0.1)
            bias = _randn(generator, outputs, dtype=dtype, device=device) if with_bias else None
            case = f"{dtype} K {reduced} N {outputs} bias {with_bias}"
            excess[case] = linear_excess(x, weight, bias)
            whole = invariant_linear(x, weight, bias)
            same = True
            for rows in (1, 3, 8):
                for first in range(0, rows_in_tiles - rows + 1, 7):
                    part = invariant_linear(x[first:first + rows], weight, bias)
                    same &= torch.equal(part, whole[first:first + rows])
            # a 3-D input (batch, 1, K) as the decode step gives it
            same &= torch.equal(invariant_linear(x[:8].unsqueeze(1), weight, bias).squeeze(1), whole[:8])
            invariant[case] = bool(same)
    # a batch large enough for LARGE_TILES (on CUDA, where they give LINEAR_TILES' bits): rows as alone
    for dtype in DTYPES:
        x = _randn(generator, LARGE_TILES_FROM_ROWS + 21, LINEAR_TILES.reduced + 40, dtype=dtype, device=device)
        weight = _randn(generator, LARGE_TILES.outputs + 9, x.shape[1], dtype=dtype, device=device, scale=0.1)
        whole = invariant_linear(x, weight)
        invariant[f"{dtype} {x.shape[0]} rows"] = all(
            torch.equal(invariant_linear(x[first:first + 3], weight), whole[first:first + 3])
            for first in (0, 130, x.shape[0] - 3))
    return excess, invariant


# -- RMSNorm -----------------------------------------------------------------------------------------


def rms_norm_excess(x, weight, epsilon) -> float:
    x64 = x.double()
    reference = weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + epsilon)
    width = x.shape[-1]
    u = unit_roundoff(x.dtype)
    # the mean of squares (width + 1 float32 operations, half of it through the square root), rsqrt, the
    # product with x, the rounding to x's dtype, the product with the weight and its rounding
    relative = (width + 1) * F32 / 2 + APPROX + 3 * F32 + 2 * u
    bound = relative * (1 + 2 * u) * reference.abs()
    result = invariant_rms_norm(x, weight, epsilon).double()
    return ((result - reference).abs() / bound.clamp_min(1e-300)).max().item()


def rms_norm_checks(device: str) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(1)
    excess, invariant = {}, {}
    for dtype in DTYPES:
        for width in (64, 100):  # a power of two, and one that pads its block
            x = _randn(generator, 8, width, dtype=dtype, device=device, scale=3.0)
            weight = (1 + _randn(generator, width, dtype=torch.float32, device=device, scale=0.2)).to(dtype)
            case = f"{dtype} width {width}"
            excess[case] = rms_norm_excess(x, weight, 1e-5)
            whole = invariant_rms_norm(x, weight, 1e-5)
            invariant[case] = all(torch.equal(invariant_rms_norm(x[first:first + rows], weight, 1e-5),
                                              whole[first:first + rows])
                                  for rows in (1, 3) for first in range(0, 8 - rows + 1, 2))
    return excess, invariant


# -- decode attention --------------------------------------------------------------------------------


def decode_rows(count, num_heads, num_kv_heads, head_dim, dtype, device, seed=2):
    """Rows as the decode batch holds them: a query, and keys/values up to the row's write position, some of
    the slots before it invalid (evicted), the one at it valid (this step's token)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        write_pos = [0, 5, 63, 64, 130, 17, 200, 90][index % 8]
        valid = torch.rand(write_pos + 1, generator=generator) < 0.7
        valid[write_pos] = True
        rows.append(dict(
            query=_randn(generator, num_heads, head_dim, dtype=dtype, device=device, scale=2.0),
            keys=_randn(generator, num_kv_heads, write_pos + 1, head_dim, dtype=dtype, device=device),
            values=_randn(generator, num_kv_heads, write_pos + 1, head_dim, dtype=dtype, device=device),
            valid=valid.to(device), write_pos=write_pos,
        ))
    return rows


def pack(rows, device, spare_pages=0, seed=0):
    """The rows in a page pool as the decode batch holds them: each row's pages drawn at random from a pool with
    ``spare_pages`` pages no row owns, page-table entries past a row's own (never read) pointing at some page;
    every slot past a row's write position holds NaN."""
    first = rows[0]
    num_heads, head_dim = first["query"].shape
    num_kv_heads, dtype = first["keys"].shape[0], first["keys"].dtype
    query = torch.stack([row["query"] for row in rows]).unsqueeze(2)  # (B, Hq, 1, d)
    own_pages = [-(-(row["write_pos"] + 1) // PAGE_SLOTS) for row in rows]
    pool_pages = sum(own_pages) + spare_pages
    order = torch.randperm(pool_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    keys = torch.full((pool_pages, num_kv_heads, PAGE_SLOTS, head_dim), float("nan"), dtype=dtype, device=device)
    values = keys.clone()
    valid = torch.zeros(pool_pages, PAGE_SLOTS, dtype=torch.bool, device=device)
    page_table = torch.full((len(rows), max(own_pages) + 1), order[-1], dtype=torch.long)
    for index, (row, pages) in enumerate(zip(rows, own_pages)):
        table, order = order[:pages], order[pages:]
        page_table[index, :pages] = torch.tensor(table)
        length = row["write_pos"] + 1
        for entry, page in enumerate(table):
            slots = slice(entry * PAGE_SLOTS, min(length, (entry + 1) * PAGE_SLOTS))
            filled = slots.stop - slots.start
            keys[page, :, :filled] = row["keys"][:, slots]
            values[page, :, :filled] = row["values"][:, slots]
            valid[page, :filled] = row["valid"][slots]
    write_pos = torch.tensor([row["write_pos"] for row in rows], device=device)
    # the model's query layout: (B, 1, Hq, d) transposed, so the kernel's strides are exercised
    query = query.transpose(1, 2).contiguous().transpose(1, 2)
    return query, keys, values, valid, page_table.to(device), write_pos


def attention_excess(row, scaling) -> float:
    """The kernel's error over its bound for one row alone."""
    result = decode_attention(*pack([row], row["query"].device), scaling)[0, 0].double()  # (Hq, d)
    num_heads, head_dim = row["query"].shape
    groups = num_heads // row["keys"].shape[0]
    q = row["query"].double()
    k = row["keys"].double().repeat_interleave(groups, dim=0)[:, row["valid"]]  # (Hq, n, d)
    v = row["values"].double().repeat_interleave(groups, dim=0)[:, row["valid"]]
    logits = (k @ q.unsqueeze(-1)).squeeze(-1) * scaling  # (Hq, n)
    weights = logits.softmax(-1)
    reference = (weights.unsqueeze(-1) * v).sum(1)
    count = k.shape[1]
    slots = row["write_pos"] + 1
    blocks = -(-slots // 64)
    u = unit_roundoff(row["query"].dtype)
    # each logit: the float32 dot product, the scaling; each weight: both its logit's and the max's error,
    # exp2, the sum over the slots and the division; then the weights rounded for the dot with the values,
    # that dot's float32 sum and the rescaling of each block, and the output's rounding
    logit_error = (head_dim * F32 * scaling * (k.abs() @ q.abs().unsqueeze(-1)).squeeze(-1)
                   + 3 * F32 * logits.abs()).amax(-1, keepdim=True)
    spread = (logits - logits.amax(-1, keepdim=True)).abs().amax(-1, keepdim=True)
    weight_error = 2 * (2 * logit_error + 2 * F32 * spread + APPROX) + (count + 2) * F32
    carried = (weights.unsqueeze(-1) * v.abs()).sum(1)
    summed = carried * (weight_error + u + (slots + 2 * blocks + 2) * F32)
    bound = summed + u * (reference.abs() + summed)
    return ((result - reference).abs() / bound.clamp_min(1e-300)).max().item()


def attention_checks(device: str) -> tuple[dict, dict]:
    excess, invariant = {}, {}
    for dtype in DTYPES:
        for num_heads, num_kv_heads, head_dim in ((8, 2, 32), (4, 4, 16), (6, 1, 80)):  # GQA, MHA, MQA; d padded
            case = f"{dtype} Hq {num_heads} Hkv {num_kv_heads} d {head_dim}"
            rows = decode_rows(8, num_heads, num_kv_heads, head_dim, dtype, device)
            scaling = head_dim**-0.5
            excess[case] = max(attention_excess(row, scaling) for row in rows)
            alone = [decode_attention(*pack([row], device), scaling)[0] for row in rows]
            same = True
            for seed, spare_pages in enumerate((1, 4, 9)):
                for order in (list(range(8)), [5, 2, 7], [6]):
                    packed = pack([rows[i] for i in order], device, spare_pages, seed)
                    batch = decode_attention(*packed, scaling)
                    same &= all(torch.equal(batch[position], alone[i]) for position, i in enumerate(order))
                    # the rows' launch order (longest first unless given) decides when a row is computed, not how
                    # (here shortest first, from a strided view)
                    shortest_first = rows_longest_first(packed[-1]).flip(0).repeat_interleave(2)[::2]
                    same &= torch.equal(decode_attention(*packed, scaling, shortest_first), batch)
            invariant[case] = bool(same)
    return excess, invariant


def kernel_checks(device: str) -> dict:
    """Every kernel's error over its bound by case, and whether each case is batch-invariant."""
    outcome = {}
    for name, check in (("linear", linear_checks), ("rms_norm", rms_norm_checks), ("attention", attention_checks)):
        excess, invariant = check(device)
        outcome[name] = {"excess": excess, "invariant": invariant}
    return outcome


# -- the decode mode in the engine -------------------------------------------------------------------

#: prompts from one page to ten, so rows take different numbers of pages, freed and reused as rows finish
ENGINE_LENGTHS = [300, 40, 600, 90, 150, 35, 520]
ENGINE_NEW_TOKENS = [6, 3, 8, 2, 5, 4, 7]


def engine_requests():
    return [DecodeRequest(random_prompt(length, seed=index + 10), tokens, set(), tag=index)
            for index, (length, tokens) in enumerate(zip(ENGINE_LENGTHS, ENGINE_NEW_TOKENS))]


@contextlib.contextmanager
def recording_logits(logits: dict):
    """Record each active row's logits at every eager decode step, by (configuration, request tag, tokens so far)."""
    real = DecodeBatch.logits

    def recording(batch, rows):
        step_logits = real(batch, rows)
        for index in batch.active_rows:
            row = batch.rows[index]
            key = row.prefilled.configuration, row.prefilled.request.tag, len(row.tokens)
            logits[key] = step_logits[index].clone()
        return step_logits

    DecodeBatch.logits = recording
    try:
        yield logits
    finally:
        DecodeBatch.logits = real


def engine_checks(device: str, use_cuda_graphs: bool = False) -> dict:
    """A tiny bfloat16 model decoding batch-invariantly in batches of 1, 3 and 8 (rows joining and leaving, taking
    and freeing pages of pools of different sizes), with the full cache and with Elastic Cache (slots evicted while decoding): whether each
    sample's tokens, and (eagerly) its logits at every step, are bitwise the same in every batch; whether the first
    token (the prefill's) is the plain path's; and whether the model's forwards are back to what they were. Then both
    methods as one grid decoding in one batch (`grid_check`)."""
    model = tiny_model("llama", num_layers=2).to(device=device, dtype=torch.bfloat16)
    outcome, alone = {}, {}
    for method in (build_method("fullkv"), build_method("elastic", capacity=40)):
        plain = {generation.tag: generation.token_ids[0]
                 for generation in generate_stream(model, method, engine_requests(), 3, use_cuda_graphs=use_cuda_graphs)}
        # after a plain run, which wraps some forwards for chunked prefills (`kvbench.engine.chunked`)
        forwards_before = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
        tokens, logits = {}, {}
        for batch_size in (1, 3, 8):
            logits[batch_size] = {}
            with recording_logits(logits[batch_size]):
                generations = generate_stream(model, method, engine_requests(), batch_size,
                                              use_cuda_graphs=use_cuda_graphs, batch_invariant=True)
                tokens[batch_size] = {generation.tag: generation.token_ids for generation in generations}
        forwards_after = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
        outcome[method.name] = {
            "tokens identical": all(tokens[size] == tokens[1] for size in (3, 8)),
            "logits identical": all(same_logits(logits[size], logits[1]) for size in (3, 8)),
            "steps recorded": len(logits[1]),
            "samples decoded": min(sum(bool(ids) for ids in tokens[size].values()) for size in (1, 3, 8)),
            "samples": len(engine_requests()),
            "first token as the plain path's": {tag: ids[0] for tag, ids in tokens[1].items()} == plain,
            "forwards restored": forwards_after == forwards_before,
        }
        alone[method.name] = tokens[1], logits[1]
    outcome["grid"] = grid_check(model, alone, use_cuda_graphs)
    outcome["prefill rms norm"] = prefill_rms_norm_check(device)
    return outcome


def tiny_snapkv_prefill(device: str, dtype: torch.dtype):
    """The prefill the prefill-kernel checks run with and without kvbench's kernels: a tiny two-layer Llama, a
    SnapKV compressor keeping 40 positions, and a 150-token request."""
    model = tiny_model("llama", num_layers=2).to(device=device, dtype=dtype)
    compressor = as_compressor(build_method("snapkv", capacity=40, window_size=8), model)
    return model, compressor, DecodeRequest(random_prompt(150, seed=5), 4, set())


def prefill_rms_norm_check(device: str) -> dict:
    """A float32 SnapKV prefill of a tiny model with its RMSNorms run by the kernel (as prefills on CUDA run them,
    `kvbench.engine.prefill`) against the model's own: whether every layer keeps the same positions and the first
    token is the same. The norms differ only in the order of the mean of squares' float32 sum (a few float32 units),
    so the kept keys agree to far below the distance between different tokens' keys."""
    from unittest import mock

    from kvbench.engine import prefill as prefill_module
    from kvbench.engine.invariant import kernel_rms_norms
    from kvbench.engine.prefill import prefill_shared

    model, compressor, request = tiny_snapkv_prefill(device, torch.float32)
    with mock.patch.object(prefill_module, "_kernel_norms_apply", return_value=False):
        own = prefill_shared(model, [compressor], request)[0]
        with kernel_rms_norms(model):
            kernel = prefill_shared(model, [compressor], request)[0]
    same_kept = all(torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5)
                    for layer_own, layer_kernel in zip(own.kept, kernel.kept)
                    for mine, theirs in zip(layer_own, layer_kernel))
    return {"kept as the model's norms keep": own.kept_per_layer == kernel.kept_per_layer and same_kept,
            "first token as the model's norms give": own.first_token == kernel.first_token}


def same_logits(logits: dict, reference: dict) -> bool:
    return logits.keys() == reference.keys() and all(torch.equal(value, reference[key]) for key, value in logits.items())


def grid_check(model, alone: dict, use_cuda_graphs: bool) -> dict:
    """The two methods as one grid in batches of 3, full-cache rows of up to ten pages beside compressed rows of
    one or two: the most configurations whose rows decoded in one step, and whether each row's tokens and (eagerly)
    logits at every step are bitwise those it gives alone in a batch of 1."""
    methods = [build_method("fullkv"), build_method("elastic", capacity=40)]
    requests = engine_requests()
    for request in requests:
        request.configurations = (0, 1)
    configurations_a_step, logits = [], {}
    real_step = DecodeBatch.step

    def recording_step(batch):
        configurations_a_step.append(len({batch.rows[index].prefilled.configuration for index in batch.active_rows}))
        return real_step(batch)

    DecodeBatch.step = recording_step
    try:
        with recording_logits(logits):
            generations = list(generate_stream(model, methods, requests, 3, use_cuda_graphs=use_cuda_graphs,
                                               batch_invariant=True))
    finally:
        DecodeBatch.step = real_step
    tokens = {(generation.configuration, generation.tag): generation.token_ids for generation in generations}
    alone_tokens = {(configuration, tag): ids for configuration, method in enumerate(methods)
                    for tag, ids in alone[method.name][0].items()}
    alone_logits = {(configuration, *key[1:]): value for configuration, method in enumerate(methods)
                    for key, value in alone[method.name][1].items()}
    return {"configurations in one step": max(configurations_a_step), "tokens identical": tokens == alone_tokens,
            "logits identical": same_logits(logits, alone_logits)}
