"""The kernels alone on the GPU: selected-block attention forward and backward scheme by scheme, its
memory floor, the sliding-window band kernels, the by-block forward's splits; and how much the blocks
that neighbouring queries select overlap in a trained model (what a tile-shared kernel could save)."""
