"""The SoCo method: whitening, decompositions, low-rank modules, rank arithmetic.

Pure torch: nothing here reads files, starts processes or knows about Ray.
"""
