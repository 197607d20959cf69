/* minimal_task.c: a corral task in C, speaking the control protocol (docs/protocol.md).
 * Compile: cc -O2 -o minimal_task minimal_task.c     (only libc; any POSIX system)
 * It does no work: it says hello, answers every transition valid in its state, refuses
 * the others, and exits 0 after EXIT, when the controller goes away (EOF) or on SIGTERM.
 * examples/c-task/ runs it in a workflow; minimal_task.cpp and minimal_task.go beside it
 * are the same task in C++ and in Go.
 * The controller sends compact JSON ({"id":N,"transition":"T","args":{...}}), so a
 * string search is enough here; a real task should use a JSON parser. */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *name[] = {"CONFIGURE", "START", "STOP", "RESET", "EXIT"};
static const char *from[] = {"STANDBY", "CONFIGURED", "RUNNING", "CONFIGURED",
                             "STANDBY CONFIGURED"}; /* the states each is valid in */
static const char *to[] = {"CONFIGURED", "RUNNING", "CONFIGURED", "STANDBY", "DONE"};
static char buf[(1 << 20) + 1]; /* one line of at most 1 MiB, plus what follows it */
static int fd;

static void say(const char *line) { /* write one whole line, however many writes it takes */
    fprintf(stderr, "minimal_task: says %s", line); /* stdout and stderr go to the task's log */
    for (size_t off = 0, n = strlen(line); off < n;) {
        ssize_t w = write(fd, line + off, n - off);
        if (w < 0) exit(1);
        off += (size_t)w;
    }
}

static void on_term(int sig) { (void)sig; _exit(0); } /* nothing to release: end at once */

static int is(const char *t, const char *n) { /* t starts with the JSON string "n" */
    size_t k = strlen(n);
    return strncmp(t, n, k) == 0 && t[k] == '"';
}

static const char *answer(const char *line, const char *state) { /* one order: the new state */
    const char *p = strstr(line, "\"id\":"), *t = strstr(line, "\"transition\":\"");
    long id = p ? atol(p + 5) : 0;
    char out[200];
    int i = 0;
    while (t && i < 5 && !is(t + 14, name[i])) i++;
    if (!t || i == 5)
        snprintf(out, sizeof out, "{\"id\":%ld,\"error\":\"unknown transition\"}\n", id);
    else if (!strstr(from[i], state))
        snprintf(out, sizeof out, "{\"id\":%ld,\"error\":\"cannot %s in state %s\"}\n", id,
                 name[i], state);
    else
        snprintf(out, sizeof out, "{\"id\":%ld,\"state\":\"%s\"}\n", id, state = to[i]);
    say(out);
    return state;
}

int main(void) {
    const char *env = getenv("CORRAL_CONTROL_FD"), *state = "STANDBY";
    char hello[100], *end = NULL;
    size_t len = 0;
    struct stat st;
    fd = env ? (int)strtol(env, &end, 10) : -1;
    if (!env || *env == '\0' || *end != '\0' || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) {
        fprintf(stderr, "CORRAL_CONTROL_FD is not set or not a socket: start me from corral\n");
        return 2;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC); /* programs this task starts do not inherit it */
    signal(SIGTERM, on_term);
    snprintf(hello, sizeof hello, "{\"state\":\"STANDBY\",\"pid\":%d,\"protocol\":1}\n",
             (int)getpid());
    say(hello); /* ready for CONFIGURE */
    for (;;) {
        ssize_t r = read(fd, buf + len, sizeof buf - len);
        if (r <= 0) return 0; /* EOF: the controller is gone */
        len += (size_t)r;
        for (char *nl; (nl = memchr(buf, '\n', len)) != NULL;) { /* each complete line */
            *nl = '\0';
            if (nl > buf) state = answer(buf, state); /* empty lines are ignored */
            if (state == to[4]) return 0; /* answered EXIT with DONE: end at once */
            len -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, len);
        }
        if (len == sizeof buf) len = 0; /* a line over 1 MiB: drop it */
    }
}
