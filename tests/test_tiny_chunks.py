"""A pass without gradient over a large batch runs in chunks of rows (the memory peak of
DPO's data set) and gives the very numbers of one pass over the whole batch."""

import pytest
import torch

from klsweep.models.tiny import NO_GRAD_CHUNK, TinyConfig, TinyGPT, no_grad_chunk_rows


@pytest.mark.parametrize("batch,group_size,rows", [
    (2048, 2, 256), (300, 2, 150), (256, 8, 256), (1000, 8, 256), (257, 1, 129)])
def test_chunks_are_equal_whole_groups_of_about_the_chunk_size(batch, group_size, rows):
    assert no_grad_chunk_rows(batch, group_size) == rows
    assert rows % group_size == 0 and rows <= NO_GRAD_CHUNK


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(TinyConfig("tiny", 2, 4, 128, 0.0), 32, 24).eval()


@pytest.mark.parametrize("group_size,padded", [(2, False), (1, False), (2, True)])
def test_a_chunked_pass_without_gradient_gives_the_whole_batchs_numbers(group_size, padded):
    model = _model()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (4 * NO_GRAD_CHUNK, 24), generator=generator)
    tokens[1::2, :8] = tokens[::2, :8]  # pairs share their prompt
    mask = None
    if padded:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[::4, :3] = False
        mask[1::4, :3] = False
    with torch.no_grad():
        chunked = model.completion_logits(tokens, mask, 8, group_size)
        with torch.enable_grad():
            whole = model.completion_logits(tokens, mask, 8, group_size).detach()
    assert torch.equal(chunked, whole)
