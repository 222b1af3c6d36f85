#include "CSupport.h"
#include <cpuid.h>
#include <sys/mman.h>
#include <unistd.h>

int tar_cpu_has_avx512f(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 16) & 1;
}
int tar_cpu_has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 5) & 1;
}

MPI_Comm tar_mpi_comm_world(void) { return MPI_COMM_WORLD; }
MPI_Datatype tar_mpi_float(void) { return MPI_FLOAT; }
MPI_Datatype tar_mpi_double(void) { return MPI_DOUBLE; }
MPI_Datatype tar_mpi_int64(void) { return MPI_INT64_T; }
MPI_Datatype tar_mpi_byte(void) { return MPI_BYTE; }
MPI_Op tar_mpi_sum(void) { return MPI_SUM; }
MPI_Op tar_mpi_max(void) { return MPI_MAX; }
MPI_Op tar_mpi_min(void) { return MPI_MIN; }
void *tar_mpi_in_place(void) { return MPI_IN_PLACE; }
int tar_mpi_thread_multiple(void) { return MPI_THREAD_MULTIPLE; }
int tar_mpi_thread_serialized(void) { return MPI_THREAD_SERIALIZED; }
MPI_Errhandler tar_mpi_errors_return(void) { return MPI_ERRORS_RETURN; }

hid_t tar_h5t_native_float(void) { return H5T_NATIVE_FLOAT; }
hid_t tar_h5t_native_int32(void) { return H5T_NATIVE_INT32; }
hid_t tar_h5t_native_uint16(void) { return H5T_NATIVE_UINT16; }
hid_t tar_h5t_native_int64(void) { return H5T_NATIVE_INT64; }
hid_t tar_h5t_native_uint8(void) { return H5T_NATIVE_UINT8; }
hid_t tar_h5t_c_s1(void) { return H5T_C_S1; }
hid_t tar_h5t_std_u16le(void) { return H5T_STD_U16LE; }
hid_t tar_h5t_std_i32le(void) { return H5T_STD_I32LE; }
hid_t tar_h5t_ieee_f32le(void) { return H5T_IEEE_F32LE; }
hid_t tar_h5t_std_i64le(void) { return H5T_STD_I64LE; }
unsigned tar_h5f_acc_trunc(void) { return H5F_ACC_TRUNC; }
unsigned tar_h5f_acc_rdonly(void) { return H5F_ACC_RDONLY; }
unsigned tar_h5f_acc_rdwr(void) { return H5F_ACC_RDWR; }
unsigned tar_h5f_acc_excl(void) { return H5F_ACC_EXCL; }
hid_t tar_h5p_dataset_create(void) { return H5P_DATASET_CREATE; }
hid_t tar_h5p_file_access(void) { return H5P_FILE_ACCESS; }
hid_t tar_h5s_all(void) { return H5S_ALL; }
hid_t tar_h5p_default(void) { return H5P_DEFAULT; }
void tar_h5_silence_errors(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

// ---- pages ----

size_t tar_page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

void *tar_pages_alloc(size_t bytes) {
    void *p = mmap(NULL, bytes > 0 ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void tar_pages_free(void *p, size_t bytes) { munmap(p, bytes > 0 ? bytes : 1); }

void tar_pages_release(void *p, size_t bytes) {
    // Callers pass whole pages (Pages.size); rounding inward keeps a wrong call harmless.
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)p + page - 1) / page * page;
    uintptr_t hi = ((uintptr_t)p + bytes) / page * page;
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}
