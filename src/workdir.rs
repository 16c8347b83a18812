//! Workdir preparation, as the kernel does it at mount (`W/work`).
