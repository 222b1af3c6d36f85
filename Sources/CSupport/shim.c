#include "CSupport.h"
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
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

void tar_name_this_thread(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }

static _Thread_local int tar_in_part;
int tar_thread_in_part(void) { return tar_in_part; }
void tar_set_thread_in_part(int in_part) { tar_in_part = in_part; }

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

// Transparent huge pages: a buffer of at least one huge page is aligned to it and marked
// MADV_HUGEPAGE, so its first writes fault 2 MB at a time instead of 4 KB (ZeRO-2 refaults its whole
// gradient buffer every step: 4 KB faults cost 0.28-0.73 s of a preset-B step, README "Scaling").

// The transparent huge page size, 0 when the kernel has them off (read once).
static size_t tar_huge_page_size(void) {
    static size_t cached = 1;  // 1: not read yet
    if (cached != 1) return cached;
    size_t size = 0;
    char mode[128] = {0};
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f) {
        if (!fgets(mode, sizeof mode, f)) mode[0] = 0;
        fclose(f);
    }
    f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r");
    if (f) {
        unsigned long v = 0;
        if (fscanf(f, "%lu", &v) == 1) size = (size_t)v;
        fclose(f);
    }
    if (strstr(mode, "[never]") || !strchr(mode, '[')) size = 0;
    cached = size;
    return cached;
}

size_t tar_pages_granule(size_t bytes, int allow_huge) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t huge = allow_huge ? tar_huge_page_size() : 0;
    return huge <= page || huge % page != 0 || bytes < huge ? page : huge;
}

void *tar_pages_alloc(size_t bytes, int allow_huge, size_t *granule) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t huge = tar_pages_granule(bytes, allow_huge);
    size_t length = ((bytes > 0 ? bytes : 1) + page - 1) / page * page;
    *granule = page;
    if (huge == page) {
        void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    // Over-allocate by one huge page, then unmap the slack before and after the aligned start.
    void *raw = mmap(NULL, length + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uintptr_t start = ((uintptr_t)raw + huge - 1) / huge * huge;
    if (start > (uintptr_t)raw) munmap(raw, start - (uintptr_t)raw);
    uintptr_t end = (uintptr_t)raw + length + huge;
    if (end > start + length) munmap((void *)(start + length), end - (start + length));
    if (madvise((void *)start, length, MADV_HUGEPAGE) == 0) *granule = huge;
    return (void *)start;
}

void tar_pages_free(void *p, size_t bytes) { munmap(p, bytes > 0 ? bytes : 1); }

void tar_pages_release(void *p, size_t bytes, size_t granule) {
    // Callers pass whole granules (tar_pages_alloc's); rounding inward keeps a wrong call harmless.
    uintptr_t lo = ((uintptr_t)p + granule - 1) / granule * granule;
    uintptr_t hi = ((uintptr_t)p + bytes) / granule * granule;
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

size_t tar_pages_resident(void *p, size_t bytes) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)p / page * page;
    size_t n = ((uintptr_t)p + bytes - lo + page - 1) / page;
    unsigned char *vec = malloc(n > 0 ? n : 1);
    if (!vec) return (size_t)-1;
    size_t resident = 0;
    if (mincore((void *)lo, n * page, vec) != 0) {
        free(vec);
        return (size_t)-1;
    }
    for (size_t i = 0; i < n; i++) resident += vec[i] & 1;
    free(vec);
    return resident * page;
}
