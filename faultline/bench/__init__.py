"""`faultline bench`: each benchmark runs faultline's real code and a small C baseline doing
the same KVM work (bench/*.c, built at run time), alternately, and reports medians and the
ratio faultline / baseline. Benchmarks are not tests: nothing in the test suite times."""
