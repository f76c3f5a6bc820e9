"""Programs: compose config -> run the method -> evaluate -> report."""

from fusion_bench.programs.fusion import ProgramConfig, run_program

__all__ = ["ProgramConfig", "run_program"]
