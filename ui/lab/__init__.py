"""The lab's panels (range test, fork, sweep, diagnostics, surface, divergence banner, notes), registered in
one table in ``panels``; ``common`` holds what they share."""
