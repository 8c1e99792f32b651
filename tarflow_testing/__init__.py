"""Support shared by the tests and the benchmarks: a real S3 server on loopback, a fault-injecting proxy, the crash
harness, real multi-process launches, readers of what training wrote. Not part of the installed packages. Its name
is the project's own so that no installed distribution's top-level ``tests`` package can shadow it."""
