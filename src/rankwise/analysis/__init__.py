"""Reading trained adapters and runs: estimates, spectra, rank patterns, diagnosis."""
