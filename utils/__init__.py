"""Library code shared by the soup scripts: soup math, I/O, evaluation, distribution."""
