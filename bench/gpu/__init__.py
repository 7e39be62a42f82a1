"""The GPU check's parts, one idea each; ``python -m bench.gpu_check`` runs them (docs/gpu.md).

measure       budget, busy share, peak memory, environment, JSON that survives a kill
trial         one model stepping the trainer's own step, optimizer and modes; timing
loaders       the phantom store and the real loader
configs       one measurement (MODEL@RES[:graphs][:compile][:bN]) and how it is taken
groups        the thesis grid's 25 groups, one JSON each, resumed across calls
equivalence   eager against CUDA graphs and compile: losses, weights, BatchNorm statistics
sweep         the mini sweep and the packing probe (processes)
"""
