"""Hooks that rft's patches call from inside OpenRLHF 0.9.3: the logic lives here, the patches only call it."""
