/*
 * first-hit: which functions of a binary a command runs, in every process it
 * becomes (fork, clone, re-exec of itself). Used by scripts/hot-text.sh.
 *
 *   first-hit ADDRS OUT PROGRAM [ARGS...]
 *
 * ADDRS lists function entry points of PROGRAM, one hex ELF address a line.
 * A breakpoint (int3) goes on each in every process image of PROGRAM; the
 * first hit in a process appends "PID COMM ADDR" to OUT and restores the
 * original byte, so each function costs one stop per process. A process that
 * execs another program (the container's user process) is let go. Like the
 * lifecycle benchmark, first-hit is a child subreaper: orphans (the
 * container's process) are reaped as soon as they exit, and first-hit
 * returns, with PROGRAM's exit status, once every one of them is gone.
 *
 * Analysis only: ptrace with breakpoints on a few thousand functions slows
 * the traced command down, and never runs outside scripts/hot-text.sh.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAXPID (1 << 22)
#define PROBE 4096 /* bytes compared at the entry point to recognise PROGRAM */

static uint64_t *addrs;        /* sorted function entries (ELF vaddrs) */
static unsigned char *orig;    /* original first byte of each */
static size_t naddrs;
static uint64_t entry;         /* e_entry of PROGRAM */
static unsigned char probe[PROBE];
static int64_t *bias;          /* per pid: load bias; 0 unknown, -1 not PROGRAM */
static unsigned char *seen_pid;
static FILE *out;

static void die(const char *what) {
  perror(what);
  exit(2);
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static long find(uint64_t a) {
  size_t lo = 0, hi = naddrs;
  while (lo < hi) {
    size_t m = (lo + hi) / 2;
    if (addrs[m] == a) return (long)m;
    if (addrs[m] < a) lo = m + 1; else hi = m;
  }
  return -1;
}

static int open_mem(pid_t pid) {
  char p[64];
  snprintf(p, sizeof p, "/proc/%d/mem", pid);
  return open(p, O_RDWR | O_CLOEXEC);
}

static void comm_of(pid_t pid, char *c, size_t n) {
  char p[64];
  snprintf(p, sizeof p, "/proc/%d/comm", pid);
  c[0] = 0;
  FILE *f = fopen(p, "r");
  if (!f) return;
  if (fgets(c, (int)n, f)) c[strcspn(c, "\n")] = 0;
  fclose(f);
  for (char *s = c; *s; s++) if (*s == ' ') *s = '_';
}

/* Load bias of PID's image if it is PROGRAM, else -1. */
static int64_t image_bias(pid_t pid) {
  char p[64];
  snprintf(p, sizeof p, "/proc/%d/auxv", pid);
  int fd = open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  uint64_t v[2], at_entry = 0;
  while (read(fd, v, sizeof v) == sizeof v)
    if (v[0] == AT_ENTRY) { at_entry = v[1]; break; }
  close(fd);
  if (!at_entry) return -1;
  unsigned char b[PROBE];
  int mem = open_mem(pid);
  ssize_t got = mem < 0 ? -1 : pread(mem, b, PROBE, (off_t)at_entry);
  if (mem >= 0) close(mem);
  if (got != PROBE || memcmp(b, probe, PROBE)) return -1;
  return (int64_t)(at_entry - entry);
}

/* A fresh image of PROGRAM (after exec): a breakpoint on every function. */
static void arm(pid_t pid) {
  bias[pid] = image_bias(pid);
  if (bias[pid] < 0) return;
  int mem = open_mem(pid);
  if (mem < 0) die("open /proc/PID/mem");
  unsigned char cc = 0xcc;
  for (size_t i = 0; i < naddrs; i++)
    if (pwrite(mem, &cc, 1, (off_t)(addrs[i] + (uint64_t)bias[pid])) != 1) die("arm");
  close(mem);
}

static void load(const char *addrfile, const char *program) {
  FILE *f = fopen(addrfile, "r");
  if (!f) die(addrfile);
  size_t cap = 1 << 14;
  addrs = malloc(cap * sizeof *addrs);
  char line[256];
  while (fgets(line, sizeof line, f)) {
    if (naddrs == cap) addrs = realloc(addrs, (cap *= 2) * sizeof *addrs);
    if (!addrs) die("realloc");
    addrs[naddrs++] = strtoull(line, NULL, 16);
  }
  fclose(f);
  qsort(addrs, naddrs, sizeof *addrs, cmp_u64);
  orig = malloc(naddrs);
  int fd = open(program, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || !orig) die(program);
  Elf64_Ehdr eh;
  if (pread(fd, &eh, sizeof eh, 0) != sizeof eh) die("ELF header");
  entry = eh.e_entry;
  int have_probe = 0;
  for (int i = 0; i < eh.e_phnum; i++) {
    Elf64_Phdr ph;
    if (pread(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + i * sizeof ph)) != sizeof ph) die("phdr");
    if (ph.p_type != PT_LOAD) continue;
    uint64_t lo = ph.p_vaddr, hi = ph.p_vaddr + ph.p_filesz;
    if (entry >= lo && entry + PROBE <= hi) {
      if (pread(fd, probe, PROBE, (off_t)(entry - lo + ph.p_offset)) != PROBE) die("probe");
      have_probe = 1;
    }
    if (!(ph.p_flags & PF_X)) continue;
    for (size_t s = 0; s < naddrs; s++)
      if (addrs[s] >= lo && addrs[s] < hi)
        if (pread(fd, &orig[s], 1, (off_t)(addrs[s] - lo + ph.p_offset)) != 1) die("text");
  }
  close(fd);
  if (!have_probe) { fprintf(stderr, "first-hit: no entry point in %s\n", program); exit(2); }
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: first-hit ADDRS OUT PROGRAM [ARGS...]\n");
    return 2;
  }
  load(argv[1], argv[3]);
  bias = calloc(MAXPID, sizeof *bias);
  seen_pid = calloc(MAXPID, 1);
  out = fopen(argv[2], "a");
  if (!bias || !seen_pid || !out) die("setup");

  if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) die("PR_SET_CHILD_SUBREAPER");
  pid_t child = fork();
  if (child < 0) die("fork");
  if (child == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    raise(SIGSTOP);
    execv(argv[3], argv + 3);
    _exit(127);
  }
  int st, code = 0;
  if (waitpid(child, &st, 0) != child) die("waitpid");
  seen_pid[child] = 1;
  ptrace(PTRACE_SETOPTIONS, child, 0,
         PTRACE_O_TRACEEXEC | PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK);
  ptrace(PTRACE_CONT, child, 0, 0);

  for (;;) {
    pid_t pid = waitpid(-1, &st, __WALL);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break; /* ECHILD: every traced process is gone or let go */
    }
    if (pid >= MAXPID) { ptrace(PTRACE_DETACH, pid, 0, 0); continue; }
    if (WIFEXITED(st) || WIFSIGNALED(st)) {
      if (pid == child) code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      continue;
    }
    if (!WIFSTOPPED(st)) continue;
    int sig = WSTOPSIG(st), event = st >> 16;
    if (sig == SIGTRAP && event == PTRACE_EVENT_EXEC) {
      arm(pid);
      if (bias[pid] < 0) { ptrace(PTRACE_DETACH, pid, 0, 0); continue; }
      ptrace(PTRACE_CONT, pid, 0, 0);
      continue;
    }
    if (sig == SIGTRAP && event) { /* fork/clone: the child is traced too */
      unsigned long np = 0;
      ptrace(PTRACE_GETEVENTMSG, pid, 0, &np);
      if (np < MAXPID) bias[np] = bias[pid];
      ptrace(PTRACE_CONT, pid, 0, 0);
      continue;
    }
    if (!seen_pid[pid]) { /* a new child's first stop */
      seen_pid[pid] = 1;
      if (sig == SIGSTOP) { ptrace(PTRACE_CONT, pid, 0, 0); continue; }
    }
    if (sig == SIGTRAP) {
      struct user_regs_struct r;
      ptrace(PTRACE_GETREGS, pid, 0, &r);
      if (!bias[pid]) bias[pid] = image_bias(pid);
      long i = bias[pid] > 0 ? find(r.rip - 1 - (uint64_t)bias[pid]) : -1;
      if (i >= 0) {
        /* Restore the byte unless a process sharing this mm already did. */
        int mem = open_mem(pid);
        unsigned char cur = 0;
        if (mem >= 0 && pread(mem, &cur, 1, (off_t)(r.rip - 1)) == 1 && cur == 0xcc)
          if (pwrite(mem, &orig[i], 1, (off_t)(r.rip - 1)) != 1) die("restore");
        if (mem >= 0) close(mem);
        char c[64];
        comm_of(pid, c, sizeof c);
        fprintf(out, "%d %s %lx\n", pid, c, (unsigned long)addrs[i]);
        r.rip -= 1;
        ptrace(PTRACE_SETREGS, pid, 0, &r);
        ptrace(PTRACE_CONT, pid, 0, 0);
        continue;
      }
    }
    ptrace(PTRACE_CONT, pid, 0, sig); /* not ours: deliver it */
  }
  fclose(out);
  return code;
}
