"""Fast implementations of the BFT operator (imported for their backend registration)."""
