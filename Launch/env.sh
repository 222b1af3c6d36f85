# Sourced by the launch scripts: lets mpirun run as root (containers, CI) and oversubscribe
# ranks on a small machine (TOOLCHAIN.md). On a real cluster, use your site's settings instead.
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
