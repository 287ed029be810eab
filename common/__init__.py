"""What every layer shares, one home each: atomic file writes (``atomic``) and provenance / the git sha
(``provenance``). Imports only the standard library (torch lazily), so data/, models/, pipeline/ and the kernel
benchmarks may all import it; the op itself (kernels/) does not."""
