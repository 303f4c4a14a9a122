"""Blocks of a coefficient problem: the learned tensors cut into consecutive runs (`--layer-size`, as
the released MEHL code cuts them), and where each block lies in the flat vector of those tensors. Pure
functions on sizes and names."""


def make_blocks(sizes, layer_size):
    """Partition tensors (given by their sizes, in order) into blocks, as the released MEHL code does:
    start a new block when the current one already holds more than `layer_size` numbers, otherwise add
    the tensor to it. layer_size=0: one block per tensor; layer_size >= total or None: one block (the
    model-wise soups). Returns a list of lists of tensor indices."""
    if layer_size is None:
        return [list(range(len(sizes)))] if sizes else []
    if layer_size < 0:
        raise ValueError(f"--layer-size must be >= 0, got {layer_size}")
    blocks, current, count = [], [], 0
    for i, size in enumerate(sizes):
        if current and count > layer_size:
            blocks.append(current)
            current, count = [], 0
        current.append(i)
        count += size
    if current:
        blocks.append(current)
    return blocks


def block_bounds(sizes, blocks):
    """(start, stop) offsets of each block in the flat vector of the tensors `sizes` (blocks are
    consecutive runs of tensor indices, as `make_blocks` gives them)."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return [(offsets[b[0]], offsets[b[-1] + 1]) for b in blocks]
