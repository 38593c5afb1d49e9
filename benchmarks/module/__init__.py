"""NSA as a module on the GPU: where the time of one layer goes (profile_steps), packed documents
(packed), the training-speed table (training: attention against SDPA and flash-nsa, the Transformer
step, the cold compile), and the peer flash-nsa as these benchmarks call it (peers)."""
