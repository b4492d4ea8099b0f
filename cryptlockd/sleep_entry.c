/*
 * cryptlockd-sleep: ExecStart= of systemd-suspend.service (our drop-in). It hands the sleep
 * to the armed cryptlockd helper.
 *
 * It runs between logind's go and the sleep, so its start is on the critical path: a
 * Python interpreter took 0.15-0.35 s there under TCG, this takes about 0.01 s. It does
 * what sleep_entry.py (the fallback for installs without a C compiler) does, by the same
 * rules, and tests/unit/test_sleep_entry.py holds both to them:
 *
 * - The helper sleeps only when told `sleep`. Before that message is sent, falling back to
 *   the stock systemd-sleep is safe; after it, never: the machine must not sleep twice for
 *   one request. The fallback logs that the sleep is unprotected and leaves a trace for the
 *   daemon (/run/cryptlockd/stock-sleep.json), which reports it in LastCycle.
 * - The system-sleep hooks live on the root filesystem, so this process, not the helper,
 *   runs them: `pre` before the helper freezes anything, `post` after it has thawed.
 *
 * The protocol (cryptlockd/helper/protocol.py) is one JSON object a line on a unix socket.
 * This side sends three fixed messages and reads four fields of the helper's, so it has a
 * small JSON reader of its own, strict about what it accepts.
 *
 * --root=DIR puts every path it uses (socket, hooks, trace, stock sleep) under DIR: the
 * host tests run it against a scripted helper.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* protocol.py and sleep_entry.py hold the same values. */
#define SOCKET_PATH "/run/cryptlockd/ramfs/sock/helper.sock"
#define STOCK_SLEEP_TRACE "/run/cryptlockd/stock-sleep.json"
#define MAX_LINE (1 << 20)
#define CONNECT_TIMEOUT_MS 2000
#define BEGIN_TIMEOUT_MS 10000
#define DONE_TIMEOUT_MS 30000
#define HOOK_TIMEOUT_MS 90000
#define NO_TIMEOUT (-1)

/* Highest precedence first; a name found in a higher one masks it in the lower ones. */
static const char *const HOOK_DIRS[] = {
    "/etc/systemd/system-sleep",
    "/usr/local/lib/systemd/system-sleep",
    "/usr/lib/systemd/system-sleep",
};
static const char *const STOCK_SLEEP[] = {
    "/usr/lib/systemd/systemd-sleep",
    "/lib/systemd/systemd-sleep",
};
/* The service manager's own variables: a hook that inherits NOTIFY_SOCKET could report on
 * this service's behalf (cryptlockd/run.py drops the same ones). */
static const char *const PRIVATE_ENV[] = {
    "NOTIFY_SOCKET=", "WATCHDOG_PID=", "WATCHDOG_USEC=", "LISTEN_FDS=", "LISTEN_PID=",
};

#define N(a) (sizeof(a) / sizeof((a)[0]))

enum { CRIT = 2, ERR = 3, WARNING = 4, INFO = 6 };

static const char *root = "";

/* systemd-suspend.service's stdout goes to the journal, where "<N>" at the start of a line
 * sets its priority (sd-daemon(3)). */
__attribute__((format(printf, 2, 3))) static void say(int priority, const char *fmt, ...) {
    char text[4096], out[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    size_t n = 0;
    for (char *line = text;;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        int w = snprintf(out + n, sizeof out - n, "<%d>cryptlockd-sleep: %s\n", priority, line);
        if (w < 0 || (size_t)w >= sizeof out - n)
            break;
        n += (size_t)w;
        if (!nl)
            break;
        line = nl + 1;
    }
    for (size_t off = 0; off < n;) {
        ssize_t r = write(STDOUT_FILENO, out + off, n - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        off += (size_t)r;
    }
}

static double boottime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long long monotonic_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool under_root(char *out, size_t size, const char *path) {
    int n = snprintf(out, size, "%s%s", root, path);
    return n >= 0 && (size_t)n < size;
}

/* -- reading the helper's messages ------------------------------------------------------ */

/* What this side reads of a message; the rest is checked to be JSON and skipped. */
struct message {
    char op[16];
    char reason[2048];
    bool has_reason, has_slept, has_success;
    bool slept, success;
};

struct reader {
    const unsigned char *p, *end;
    int depth;
};

static void skip_ws(struct reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static bool valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        size_t len;
        unsigned int cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, cp = c & 0x1f, min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, cp = c & 0x0f, min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (n - i < len)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

static void put_utf8(char *out, size_t size, size_t *n, unsigned int cp) {
    char b[4];
    size_t len;
    if (cp < 0x80) {
        b[0] = (char)cp, len = 1;
    } else if (cp < 0x800) {
        b[0] = (char)(0xc0 | cp >> 6), b[1] = (char)(0x80 | (cp & 0x3f)), len = 2;
    } else if (cp < 0x10000) {
        b[0] = (char)(0xe0 | cp >> 12), b[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        b[2] = (char)(0x80 | (cp & 0x3f)), len = 3;
    } else {
        b[0] = (char)(0xf0 | cp >> 18), b[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), b[3] = (char)(0x80 | (cp & 0x3f)), len = 4;
    }
    /* Too long for `out`: the rest is dropped whole characters at a time. */
    if (out && *n + len < size) {
        memcpy(out + *n, b, len);
        *n += len;
        out[*n] = '\0';
    }
}

static bool hex4(struct reader *r, unsigned int *v) {
    if (r->end - r->p < 4)
        return false;
    *v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = *r->p++;
        unsigned int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return false;
        *v = *v << 4 | d;
    }
    return true;
}

/* A JSON string at r->p, decoded into `out` (NULL: only checked). */
static bool read_string(struct reader *r, char *out, size_t size) {
    size_t n = 0;
    if (out)
        out[0] = '\0';
    if (r->p >= r->end || *r->p != '"')
        return false;
    r->p++;
    while (r->p < r->end) {
        unsigned char c = *r->p++;
        if (c == '"')
            return true;
        if (c < 0x20)
            return false;
        if (c != '\\') {
            /* The line is valid UTF-8, so copying bytes copies characters. */
            if (out && n + 1 < size) {
                out[n++] = (char)c;
                out[n] = '\0';
            }
            continue;
        }
        if (r->p >= r->end)
            return false;
        unsigned int cp;
        switch (*r->p++) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (!hex4(r, &cp))
                return false;
            if (cp >= 0xd800 && cp <= 0xdbff && r->end - r->p >= 6 && r->p[0] == '\\' &&
                r->p[1] == 'u') {
                const unsigned char *save = r->p;
                unsigned int low;
                r->p += 2;
                if (hex4(r, &low) && low >= 0xdc00 && low <= 0xdfff)
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                else
                    r->p = save;
            }
            if (cp >= 0xd800 && cp <= 0xdfff)
                cp = 0xfffd; /* a lone surrogate has no UTF-8 */
            break;
        default:
            return false;
        }
        put_utf8(out, size, &n, cp);
    }
    return false;
}

static bool read_digits(struct reader *r) {
    const unsigned char *start = r->p;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
        r->p++;
    return r->p > start;
}

static bool read_number(struct reader *r) {
    if (r->p < r->end && *r->p == '-')
        r->p++;
    if (r->p < r->end && *r->p == '0')
        r->p++;
    else if (!read_digits(r))
        return false;
    if (r->p < r->end && *r->p == '.') {
        r->p++;
        if (!read_digits(r))
            return false;
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
        r->p++;
        if (r->p < r->end && (*r->p == '+' || *r->p == '-'))
            r->p++;
        if (!read_digits(r))
            return false;
    }
    return true;
}

static bool read_word(struct reader *r, const char *word) {
    size_t len = strlen(word);
    if ((size_t)(r->end - r->p) < len || memcmp(r->p, word, len) != 0)
        return false;
    r->p += len;
    return true;
}

static bool read_value(struct reader *r);

static bool read_container(struct reader *r, unsigned char close, bool keys) {
    if (++r->depth > 64)
        return false;
    r->p++;
    skip_ws(r);
    if (r->p < r->end && *r->p == close) {
        r->p++;
        r->depth--;
        return true;
    }
    for (;;) {
        if (keys) {
            if (!read_string(r, NULL, 0))
                return false;
            skip_ws(r);
            if (r->p >= r->end || *r->p++ != ':')
                return false;
        }
        if (!read_value(r))
            return false;
        skip_ws(r);
        if (r->p >= r->end)
            return false;
        unsigned char c = *r->p++;
        if (c == close) {
            r->depth--;
            return true;
        }
        if (c != ',')
            return false;
        skip_ws(r);
    }
}

static bool read_value(struct reader *r) {
    skip_ws(r);
    if (r->p >= r->end)
        return false;
    switch (*r->p) {
    case '"': return read_string(r, NULL, 0);
    case '{': return read_container(r, '}', true);
    case '[': return read_container(r, ']', false);
    case 't': return read_word(r, "true");
    case 'f': return read_word(r, "false");
    case 'n': return read_word(r, "null");
    default: return read_number(r);
    }
}

/* A bool field: true is true; anything else (false, or a value of another type) is not. */
static bool read_flag(struct reader *r, bool *flag) {
    skip_ws(r);
    *flag = read_word(r, "true");
    return *flag || read_value(r);
}

/* NULL when `line` is a message this side can read; else why not. */
static const char *parse_message(const char *line, size_t len, struct message *m) {
    static const char *const ops[] = {
        "arm", "armed", "record", "disarm", "begin", "ready",
        "sleep", "resumed", "finish", "done", "error",
    };
    static char why[96];
    struct reader r = {(const unsigned char *)line, (const unsigned char *)line + len, 0};
    bool has_op = false;

    memset(m, 0, sizeof *m);
    if (!valid_utf8(r.p, len))
        return "not a JSON line: not UTF-8";
    skip_ws(&r);
    if (r.p >= r.end || *r.p != '{')
        return "a message must be an object with a string 'op'";
    r.p++;
    r.depth = 1;
    skip_ws(&r);
    if (r.p < r.end && *r.p == '}') {
        r.p++;
    } else {
        for (;;) {
            char key[16];
            skip_ws(&r);
            if (!read_string(&r, key, sizeof key))
                return "not a JSON line: a bad key";
            skip_ws(&r);
            if (r.p >= r.end || *r.p++ != ':')
                return "not a JSON line: no ':' after a key";
            skip_ws(&r);
            bool ok;
            if (strcmp(key, "op") == 0 && r.p < r.end && *r.p == '"') {
                ok = read_string(&r, m->op, sizeof m->op);
                has_op = true;
            } else if (strcmp(key, "reason") == 0 && r.p < r.end && *r.p == '"') {
                ok = read_string(&r, m->reason, sizeof m->reason);
                m->has_reason = true;
            } else if (strcmp(key, "slept") == 0) {
                ok = read_flag(&r, &m->slept);
                m->has_slept = true;
            } else if (strcmp(key, "success") == 0) {
                ok = read_flag(&r, &m->success);
                m->has_success = true;
            } else {
                if (strcmp(key, "op") == 0)
                    has_op = false; /* a later "op" of another type replaces it */
                m->has_reason |= strcmp(key, "reason") == 0;
                ok = read_value(&r);
            }
            if (!ok)
                return "not a JSON line: a bad value";
            skip_ws(&r);
            if (r.p >= r.end)
                return "not a JSON line: it ends inside the object";
            unsigned char c = *r.p++;
            if (c == '}')
                break;
            if (c != ',')
                return "not a JSON line: expected ',' or '}'";
        }
    }
    skip_ws(&r);
    if (r.p != r.end)
        return "not a JSON line: extra data after the object";
    if (!has_op)
        return "a message must be an object with a string 'op'";
    for (size_t i = 0; i < N(ops); i++) {
        if (strcmp(m->op, ops[i]) != 0)
            continue;
        const char *missing = NULL;
        if (strcmp(m->op, "resumed") == 0 && !m->has_slept)
            missing = m->has_reason ? "slept" : "slept, reason";
        else if (strcmp(m->op, "resumed") == 0 && !m->has_reason)
            missing = "reason";
        else if (strcmp(m->op, "done") == 0 && !m->has_success)
            missing = "success";
        else if (strcmp(m->op, "error") == 0 && !m->has_reason)
            missing = "reason";
        if (!missing)
            return NULL;
        snprintf(why, sizeof why, "'%s' message without %s", m->op, missing);
        return why;
    }
    snprintf(why, sizeof why, "unknown message '%s'", m->op);
    return why;
}

/* -- the channel to the helper ---------------------------------------------------------- */

struct channel {
    int fd;
    char *buf;
    size_t len, cap;
};

static int helper_connect(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char path[PATH_MAX];
    if (!under_root(path, sizeof path, SOCKET_PATH) || strlen(path) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    /* connect() on a unix socket waits for room in the listener's backlog this long, and
     * a send for room in the buffer. */
    struct timeval tv = {CONNECT_TIMEOUT_MS / 1000, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* 0, or the errno of the failure. */
static int send_line(struct channel *ch, const char *line) {
    size_t n = strlen(line);
    for (size_t off = 0; off < n;) {
        ssize_t w = send(ch->fd, line + off, n - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return errno;
        off += (size_t)w;
    }
    return 0;
}

/* The helper's next message. False when it went away, when `timeout_ms` passed first
 * (NO_TIMEOUT: wait as long as it takes), or when it sent what this side cannot read. */
static bool receive(struct channel *ch, int timeout_ms, struct message *m) {
    long long deadline = timeout_ms < 0 ? -1 : monotonic_ms() + timeout_ms;
    for (;;) {
        char *nl;
        while (ch->len && (nl = memchr(ch->buf, '\n', ch->len)) != NULL) {
            size_t linelen = (size_t)(nl - ch->buf);
            bool blank = true;
            for (size_t i = 0; i < linelen && blank; i++)
                blank = strchr(" \t\r", ch->buf[i]) != NULL;
            const char *why = blank ? NULL : parse_message(ch->buf, linelen, m);
            ch->len -= linelen + 1;
            memmove(ch->buf, nl + 1, ch->len);
            if (blank)
                continue;
            if (why) {
                say(ERR, "a bad message from the helper: %s", why);
                return false;
            }
            return true;
        }
        if (ch->len > MAX_LINE) {
            say(ERR, "a bad message from the helper: line too long");
            return false;
        }
        int wait = -1;
        if (deadline >= 0) {
            long long left = deadline - monotonic_ms();
            wait = left > 0 ? (int)left : 0;
        }
        struct pollfd pfd = {.fd = ch->fd, .events = POLLIN};
        int ready = poll(&pfd, 1, wait);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready <= 0)
            return false;
        if (ch->cap - ch->len < 65536) {
            size_t cap = ch->cap ? ch->cap * 2 : 131072;
            char *buf = realloc(ch->buf, cap);
            if (!buf)
                return false;
            ch->buf = buf, ch->cap = cap;
        }
        ssize_t r = recv(ch->fd, ch->buf + ch->len, 65536, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        ch->len += (size_t)r;
    }
}

/* -- the hooks -------------------------------------------------------------------------- */

struct hook {
    char name[NAME_MAX + 1];
    char path[PATH_MAX];
};

static int by_name(const void *a, const void *b) {
    return strcmp(((const struct hook *)a)->name, ((const struct hook *)b)->name);
}

/* The executables of the hook directories, masked by name as systemd does (searchpath.py);
 * NULL with *n = 0 for none. */
static struct hook *hook_programs(size_t *n) {
    struct hook *hooks = NULL;
    size_t count = 0, cap = 0;
    *n = 0;
    for (size_t d = 0; d < N(HOOK_DIRS); d++) {
        char dir[PATH_MAX];
        if (!under_root(dir, sizeof dir, HOOK_DIRS[d]))
            continue;
        DIR *dp = opendir(dir);
        if (!dp) {
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            say(WARNING, "cannot read the sleep hooks: %s: %s", dir, strerror(errno));
            free(hooks);
            return NULL;
        }
        struct dirent *de;
        while ((de = readdir(dp)) != NULL) {
            bool seen = false;
            if (de->d_name[0] == '.')
                continue;
            for (size_t i = 0; i < count && !seen; i++)
                seen = strcmp(hooks[i].name, de->d_name) == 0;
            if (seen)
                continue;
            if (count == cap) {
                cap = cap ? cap * 2 : 16;
                struct hook *grown = realloc(hooks, cap * sizeof *hooks);
                if (!grown)
                    break;
                hooks = grown;
            }
            snprintf(hooks[count].name, sizeof hooks[count].name, "%s", de->d_name);
            if (snprintf(hooks[count].path, sizeof hooks[count].path, "%s/%s", dir,
                         de->d_name) < (int)sizeof hooks[count].path)
                count++;
        }
        closedir(dp);
    }
    if (count)
        qsort(hooks, count, sizeof *hooks, by_name);
    size_t kept = 0;
    for (size_t i = 0; i < count; i++) {
        char real[PATH_MAX];
        struct stat st;
        /* A name linked to /dev/null masks the lower ones without taking their place. */
        if (realpath(hooks[i].path, real) && strcmp(real, "/dev/null") == 0)
            continue;
        if (stat(hooks[i].path, &st) < 0 || !S_ISREG(st.st_mode) ||
            access(hooks[i].path, X_OK) < 0)
            continue;
        hooks[kept++] = hooks[i];
    }
    *n = kept;
    return hooks;
}

static char **hook_env(void) {
    extern char **environ;
    size_t count = 0, n = 0;
    while (environ[count])
        count++;
    char **env = calloc(count + 2, sizeof *env);
    if (!env)
        return NULL;
    for (size_t i = 0; i < count; i++) {
        bool drop = strncmp(environ[i], "SYSTEMD_SLEEP_ACTION=", 21) == 0;
        for (size_t k = 0; k < N(PRIVATE_ENV) && !drop; k++)
            drop = strncmp(environ[i], PRIVATE_ENV[k], strlen(PRIVATE_ENV[k])) == 0;
        if (!drop)
            env[n++] = environ[i];
    }
    env[n++] = "SYSTEMD_SLEEP_ACTION=suspend";
    env[n] = NULL;
    return env;
}

/* Waits for the hook until `deadline` (monotonic ms); a hook still running then is killed,
 * so a hung hook cannot hold the sleep (or the wake) for ever. Its status, or -1 when its
 * status is lost. */
static int wait_hook(pid_t pid, long long deadline, bool *timed_out) {
    int status;
    *timed_out = false;
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd >= 0) {
        struct pollfd pfd = {.fd = pidfd, .events = POLLIN};
        int ready;
        do {
            long long left = deadline - monotonic_ms();
            ready = poll(&pfd, 1, left > 0 ? (int)left : 0);
        } while (ready < 0 && errno == EINTR);
        close(pidfd);
        if (ready == 0) {
            kill(pid, SIGKILL);
            *timed_out = true;
        }
    }
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return status;
}

/* All at once, as systemd-sleep runs them (execute_directories, EXEC_DIR_PARALLEL): one
 * after another, a few hooks cost the sum of their times on the way to the sleep. They all
 * share one deadline, HOOK_TIMEOUT_MS from their start. */
static void run_hooks(const char *phase) {
    size_t n;
    struct hook *hooks = hook_programs(&n);
    char **env = n ? hook_env() : NULL;
    pid_t *pids = env ? calloc(n, sizeof *pids) : NULL;
    for (size_t i = 0; i < n && pids; i++) {
        /* Their stdout and stderr are ours: the journal, as under the stock systemd-sleep. */
        char *argv[] = {hooks[i].path, (char *)phase, "suspend", NULL};
        int err = posix_spawn(&pids[i], hooks[i].path, NULL, NULL, argv, env);
        if (err) {
            pids[i] = 0;
            say(WARNING, "hook %s %s could not run: %s", hooks[i].path, phase, strerror(err));
        }
    }
    long long deadline = monotonic_ms() + HOOK_TIMEOUT_MS;
    for (size_t i = 0; i < n && pids; i++) {
        if (!pids[i])
            continue;
        bool timed_out;
        int status = wait_hook(pids[i], deadline, &timed_out);
        if (timed_out)
            say(WARNING, "hook %s %s timed out after %d s, killed", hooks[i].path, phase,
                HOOK_TIMEOUT_MS / 1000);
        else if (status < 0)
            say(WARNING, "hook %s %s: lost its status: %s", hooks[i].path, phase,
                strerror(errno));
        else if (WIFSIGNALED(status))
            say(WARNING, "hook %s %s failed (%d)", hooks[i].path, phase, -WTERMSIG(status));
        else if (WEXITSTATUS(status) != 0)
            say(WARNING, "hook %s %s failed (%d)", hooks[i].path, phase, WEXITSTATUS(status));
    }
    if (n && !pids)
        say(WARNING, "cannot run the %s hooks: out of memory", phase);
    free(pids);
    free(env);
    free(hooks);
}

/* -- the stock fallback ----------------------------------------------------------------- */

/* `s` as a JSON string: quotes, backslashes and control characters escaped. */
static void json_string(char *out, size_t size, const char *s) {
    size_t n = 0;
    out[n++] = '"';
    for (; *s && n + 8 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            n += (size_t)snprintf(out + n, size - n, "\\%c", c);
        else if (c < 0x20)
            n += (size_t)snprintf(out + n, size - n, "\\u%04x", c);
        else
            out[n++] = (char)c;
    }
    out[n++] = '"';
    out[n] = '\0';
}

static int mkdirs(char *path, mode_t mode) {
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        int r = mkdir(path, mode);
        *p = '/';
        if (r < 0 && errno != EEXIST)
            return -1;
    }
    return mkdir(path, mode) < 0 && errno != EEXIST ? -1 : 0;
}

/* For the daemon, which cannot see this fallback otherwise: it reports the sleep as
 * unprotected, with `why`, in LastCycle and CycleFinished (also when it was not running and
 * finds the trace at its start). Written whole or not at all (rename). */
static void leave_trace(const char *why) {
    char path[PATH_MAX], tmp[PATH_MAX + 16], dir[PATH_MAX], reason[4096], body[4200];
    if (!under_root(path, sizeof path, STOCK_SLEEP_TRACE)) {
        say(ERR, "cannot leave the trace of this unprotected sleep: path too long");
        return;
    }
    snprintf(dir, sizeof dir, "%s", path);
    *strrchr(dir, '/') = '\0';
    snprintf(tmp, sizeof tmp, "%s.%d", path, (int)getpid());
    json_string(reason, sizeof reason, why);
    int len = snprintf(body, sizeof body, "{\"reason\":%s,\"boottime\":%.9f}", reason,
                       boottime());
    int fd = -1;
    bool ok = mkdirs(dir, 0700) == 0 &&
              (fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) >= 0 &&
              write(fd, body, (size_t)len) == len;
    if (fd >= 0 && close(fd) < 0)
        ok = false;
    if (ok && rename(tmp, path) == 0)
        return;
    /* The sleep goes ahead all the same; only the report is lost. */
    say(ERR, "cannot leave the trace of this unprotected sleep in %s: %s", path,
        strerror(errno));
    unlink(tmp);
}

static int stock_sleep(const char *why) {
    say(CRIT, "this sleep is UNPROTECTED, the LUKS keys stay in RAM: %s", why);
    leave_trace(why);
    for (size_t i = 0; i < N(STOCK_SLEEP); i++) {
        char path[PATH_MAX];
        if (under_root(path, sizeof path, STOCK_SLEEP[i]) && access(path, X_OK) == 0) {
            char *argv[] = {path, "suspend", NULL};
            execv(path, argv);
            say(ERR, "cannot run %s: %s", path, strerror(errno));
        }
    }
    say(ERR, "no systemd-sleep found");
    return 1;
}

/* What the helper said went wrong. */
static const char *why(const struct message *m, bool received) {
    if (!received)
        return "no answer";
    if (strcmp(m->op, "error") == 0 || strcmp(m->op, "resumed") == 0)
        return m->reason;
    return m->op;
}

/* -- the hand-over ---------------------------------------------------------------------- */

int main(int argc, char **argv) {
    double started = boottime();
    char line[512], text[4096];

    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--root=", 7) == 0) {
            root = argv[i] + 7;
        } else {
            fputs("usage: cryptlockd-sleep [--root=DIR]\n", stderr);
            return 2;
        }
    }

    struct channel ch = {.fd = helper_connect()};
    if (ch.fd < 0)
        return stock_sleep("no cryptlockd helper is armed "
                           "(is cryptlockd running, and protecting any LUKS device?)");
    int err = send_line(&ch, "{\"op\":\"begin\",\"lock\":false}\n");
    if (err) {
        snprintf(text, sizeof text, "the helper went away: %s", strerror(err));
        return stock_sleep(text);
    }
    struct message reply;
    bool got = receive(&ch, BEGIN_TIMEOUT_MS, &reply);
    if (!got || strcmp(reply.op, "ready") != 0) {
        snprintf(text, sizeof text, "the helper is not armed: %s", why(&reply, got));
        return stock_sleep(text);
    }
    double pre_start = boottime();
    run_hooks("pre");
    double pre_end = boottime();
    /* From here on the helper owns the sleep: whatever happens, no second sleep. */
    snprintf(line, sizeof line,
             "{\"op\":\"sleep\",\"times\":{\"sleep_entry\":%.9f,\"hooks_pre_start\":%.9f,"
             "\"hooks_pre_end\":%.9f}}\n",
             started, pre_start, pre_end);
    err = send_line(&ch, line);
    if (err) {
        say(CRIT, "could not hand the sleep to the helper: %s; not sleeping", strerror(err));
        return 1;
    }
    struct message result;
    bool resumed = receive(&ch, NO_TIMEOUT, &result);
    double post_start = boottime();
    run_hooks("post");
    double post_end = boottime();
    if (!resumed) {
        say(CRIT, "the helper went away during the cycle");
        return 1;
    }
    snprintf(line, sizeof line,
             "{\"op\":\"finish\",\"times\":{\"hooks_post_start\":%.9f,\"hooks_post_end\":%.9f}}\n",
             post_start, post_end);
    err = send_line(&ch, line);
    /* Its answer (or its absence) below says how the cycle ended. */
    if (err)
        say(WARNING, "could not tell the helper the post hooks ran: %s", strerror(err));
    struct message done;
    bool finished = receive(&ch, DONE_TIMEOUT_MS, &done);
    if (strcmp(result.op, "resumed") != 0 || !result.slept) {
        say(ERR, "the protected sleep failed: %s", why(&result, true));
        return 1;
    }
    if (finished && strcmp(done.op, "done") == 0 && done.success) {
        say(INFO, "protected sleep done");
    } else {
        say(WARNING, "protected sleep done: %s",
            result.reason[0] ? result.reason : "see the cycle record");
    }
    return 0;
}
