//! Integration tests: the real `factoryd` binary, and (as the issues land) real servers started
//! on free loopback ports and stopped on drop. One test binary, one module per area.

mod cli;
mod sources_git;
mod sources_local;
mod sources_tarball;
mod support;
