"""FX graph passes (imported as ``nf4compile.passes``)."""
