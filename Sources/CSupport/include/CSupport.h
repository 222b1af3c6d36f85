// The only C in the project: OpenBLAS (cblas), OpenMPI and HDF5 headers, plus tiny wrappers
// for the macros Swift cannot import (TOOLCHAIN.md). Only the Swift module `Platform` imports this.
#ifndef TENSORAR_CSUPPORT_H
#define TENSORAR_CSUPPORT_H

#include <cblas.h>
#include <openmpi/mpi.h>
#include <hdf5/serial/hdf5.h>
#include <stddef.h>
#include <stdint.h>

// OpenBLAS extras (declared in openblas_config.h; repeated here so the header set stays small).
char *openblas_get_config(void);
char *openblas_get_corename(void);
int openblas_get_num_threads(void);
void openblas_set_num_threads(int);

// CPU features, for choosing OPENBLAS_CORETYPE before the library is used.
int tar_cpu_has_avx512f(void);
int tar_cpu_has_avx2(void);
// Names the calling thread (as /proc, top, perf and gdb show it; at most 15 characters are kept).
void tar_name_this_thread(const char *name);
// Whether the calling thread is running a part of a ComputePool job (a thread-local flag): a
// kernel called there runs on that thread alone.
int tar_thread_in_part(void);
void tar_set_thread_in_part(int in_part);

// Whole pages from the OS (mmap), for buffers whose pages are handed back while they live
// (ZeRO-2 gradients: each bucket's pages go back once its reduce-scatter is done).
size_t tar_page_size(void);
/// The unit `tar_pages_alloc` hands pages back in for a buffer of `bytes`: the transparent huge page size
/// when allow_huge, the buffer is at least one huge page and the kernel allows them, else the page size.
size_t tar_pages_granule(size_t bytes, int allow_huge);
/// Zeroed pages for `bytes`; *granule: the unit `tar_pages_release` hands back (`tar_pages_granule`'s,
/// or the page size when the kernel refuses MADV_HUGEPAGE).
void *tar_pages_alloc(size_t bytes, int allow_huge, size_t *granule);
void tar_pages_free(void *p, size_t bytes);
/// Hands back the whole granules inside [p, p + bytes): they read as zeros when touched again.
void tar_pages_release(void *p, size_t bytes, size_t granule);
/// Bytes of the pages touching [p, p + bytes) that are resident (mincore), or (size_t)-1 on error.
size_t tar_pages_resident(void *p, size_t bytes);

// Weights packed once for products with few rows (packed_gemm.c): y (m, n) = x (m, k) W^T (+ y),
// W (n, k) row-major with leading dimension ldw. AVX-512 only (check tar_cpu_has_avx512f first).
// Output columns per packed panel.
#define TAR_PACKED_PANEL 64
size_t tar_packed_floats(size_t n, size_t k);
size_t tar_packed_panels(size_t n);
void tar_pack_weights(const float *w, size_t n, size_t k, size_t ldw, float *packed);
/// Columns of panels [first_panel, end_panel) only (64 columns a panel), so threads can split them.
void tar_sgemm_packed(size_t m, size_t n, size_t k, const float *x, size_t ldx, const float *packed, float *y,
                      size_t ldy, int accumulate, size_t first_panel, size_t end_panel);

// MPI handles are macros over addresses of globals.
MPI_Comm tar_mpi_comm_world(void);
MPI_Datatype tar_mpi_float(void);
MPI_Datatype tar_mpi_double(void);
MPI_Datatype tar_mpi_int64(void);
MPI_Datatype tar_mpi_byte(void);
MPI_Op tar_mpi_sum(void);
MPI_Op tar_mpi_max(void);
MPI_Op tar_mpi_min(void);
void *tar_mpi_in_place(void);
int tar_mpi_thread_multiple(void);
int tar_mpi_thread_serialized(void);
/// MPI_ERRORS_RETURN: makes MPI calls return error codes instead of aborting, so Swift can throw.
MPI_Errhandler tar_mpi_errors_return(void);

// HDF5 type and property ids are macros that call H5open().
hid_t tar_h5t_native_float(void);
hid_t tar_h5t_native_int32(void);
hid_t tar_h5t_native_uint16(void);
hid_t tar_h5t_native_int64(void);
hid_t tar_h5t_native_uint8(void);
hid_t tar_h5t_c_s1(void);
hid_t tar_h5t_std_u16le(void);
hid_t tar_h5t_std_i32le(void);
hid_t tar_h5t_ieee_f32le(void);
hid_t tar_h5t_std_i64le(void);
unsigned tar_h5f_acc_trunc(void);
unsigned tar_h5f_acc_rdonly(void);
unsigned tar_h5f_acc_rdwr(void);
unsigned tar_h5f_acc_excl(void);
hid_t tar_h5p_dataset_create(void);
hid_t tar_h5p_file_access(void);
hid_t tar_h5s_all(void);
hid_t tar_h5p_default(void);
/// Turns off HDF5's automatic error printing (we report errors ourselves).
void tar_h5_silence_errors(void);

#endif
