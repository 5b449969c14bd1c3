/* faultline bench exit-loop, C baseline: the same guest image as faultline's run, a plain
 * KVM_RUN loop that decodes each exit and dispatches on the port like KvmRun._vcpu_loop
 * (report records read from RAM, serial bytes buffered, any other port counted).
 * Prints the time from the end of the R_BOOT report's handling to the arrival of the next
 * report: with BOOT_OPT_BENCH_EXITS the guest's bench exits lie in between. */
#include "bench.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE_DIR\n", argv[0]);
        return 2;
    }
    setup(argv[1]);
    uint64_t t_start = 0, t_end = 0, io = 0, serial_len = 0;
    char serial[256];
    int booted = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t n = run->io.size * run->io.count;
            io++;
            if (run->io.direction != KVM_EXIT_IO_OUT) {
                memset(data, 0xff, n);
            } else if (run->io.port == REPORT_PORT) {
                uint32_t gpa = 0;
                memcpy(&gpa, data, n < 4 ? n : 4);
                struct report rep;
                int kind = report_kind(gpa, &rep);
                if (booted) {
                    t_end = now_ns();
                    break;
                }
                if (kind == R_PANIC) {
                    fprintf(stderr, "bench: guest panic %llu\n", (unsigned long long)rep.a);
                    return 3;
                }
                if (kind == R_BOOT) {
                    booted = 1;
                    t_start = now_ns();
                }
            } else if (run->io.port == SERIAL_PORT) {
                for (uint32_t i = 0; i < n && serial_len < sizeof(serial); i++)
                    serial[serial_len++] = (char)data[i];
                if (serial_len && (serial[serial_len - 1] == '\n' || serial_len >= 200))
                    serial_len = 0;
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, run->mmio.len);
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            break;
        } else {
            fprintf(stderr, "bench: unexpected exit %u\n", run->exit_reason);
            return 3;
        }
    }
    if (!t_end) {
        fprintf(stderr, "bench: the guest halted before the end marker\n");
        return 3;
    }
    printf("{\"interval_ns\": %llu, \"io_exits\": %llu}\n", (unsigned long long)(t_end - t_start),
           (unsigned long long)io);
    return 0;
}
