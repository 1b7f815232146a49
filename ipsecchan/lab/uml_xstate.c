/*
 * Preloaded into user-mode-linux (LD_PRELOAD) on hosts whose XSAVE area is larger than the
 * 832 bytes (x87, SSE, AVX) that Debian 12's UML kernel (6.1) knows of: AVX-512, PKRU or AMX.
 *
 * UML saves and restores each guest thread's vector registers with ptrace
 * GETREGSET/SETREGSET(NT_X86_XSTATE) on a buffer of 832 bytes. The host kernel truncates a
 * short GET, but accepts a SET only of exactly its own XSAVE size, else EFAULT, and UML
 * panics ("userspace - ptrace set fp regs failed, errno = 14") as init starts. Newer UML
 * kernels size the buffer from the host; this shim does it for the old one:
 *
 *   GET with a short buffer: the whole area is read; UML gets its 832 bytes, and the rest
 *     (AVX-512, PKRU, AMX state) is kept here under UML's buffer address, which is per
 *     guest thread.
 *   SET with a short buffer: UML's bytes followed by what was kept for that buffer. A
 *     buffer never read (a new thread's copy of its parent's) gets those components in
 *     their initial state, by clearing their bits in the XSAVE header.
 *
 * So a guest process keeps its AVX-512 registers across UML's context switches (glibc's
 * EVEX string functions hold data in ymm16-31 and the opmask registers). Every other
 * request goes to glibc's ptrace unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#define REQ_GETREGSET 0x4204
#define REQ_SETREGSET 0x4205
#define NOTE_X86_XSTATE 0x202
#define XSAVE_MAX 65536
#define XSTATE_BV_OFFSET 512
/* Components 0-2 (x87, SSE, AVX) lie in the first 832 bytes of the standard format. */
#define XFEATURES_IN_HEAD 0x7ULL
#define SLOTS 16384 /* UML buffers (one per guest task, addresses recycled): far more than live */

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

struct kept {
	const void *buffer; /* UML's buffer address: the key */
	size_t head;        /* UML's length */
	unsigned char *tail;
};

static struct kept kept[SLOTS];
static unsigned char whole[XSAVE_MAX] __attribute__((aligned(64)));

static ptrace_fn real_ptrace(void)
{
	static ptrace_fn fn;
	if (!fn)
		fn = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	return fn;
}

static struct kept *slot_of(const void *buffer)
{
	size_t i = ((uintptr_t)buffer >> 4) % SLOTS;
	for (size_t n = 0; n < SLOTS; n++, i = (i + 1) % SLOTS)
		if (kept[i].buffer == buffer || kept[i].buffer == NULL)
			return &kept[i];
	return &kept[((uintptr_t)buffer >> 4) % SLOTS]; /* full: reuse */
}

static long get_xstate(ptrace_fn fn, pid_t pid, struct iovec *iov)
{
	struct iovec all = {whole, sizeof(whole)};
	long r = fn(REQ_GETREGSET, pid, (void *)NOTE_X86_XSTATE, &all);
	if (r < 0)
		return r;
	if (all.iov_len <= iov->iov_len) { /* UML's buffer holds it all */
		memcpy(iov->iov_base, whole, all.iov_len);
		iov->iov_len = all.iov_len;
		return r;
	}
	struct kept *k = slot_of(iov->iov_base);
	size_t tail = all.iov_len - iov->iov_len;
	if (k->buffer != iov->iov_base || k->head != iov->iov_len) {
		free(k->tail);
		k->tail = malloc(tail);
		k->buffer = k->tail ? iov->iov_base : NULL;
		k->head = iov->iov_len;
	}
	memcpy(iov->iov_base, whole, iov->iov_len);
	if (k->tail)
		memcpy(k->tail, whole + iov->iov_len, tail);
	return r;
}

static long set_xstate(ptrace_fn fn, pid_t pid, struct iovec *iov)
{
	static size_t size; /* the host's XSAVE size, read once */
	if (!size) {
		struct iovec all = {whole, sizeof(whole)};
		if (fn(REQ_GETREGSET, pid, (void *)NOTE_X86_XSTATE, &all) < 0)
			return -1;
		size = all.iov_len;
	}
	if (iov->iov_len >= size || iov->iov_len <= XSTATE_BV_OFFSET + 8)
		return fn(REQ_SETREGSET, pid, (void *)NOTE_X86_XSTATE, iov);
	memcpy(whole, iov->iov_base, iov->iov_len);
	struct kept *k = slot_of(iov->iov_base);
	if (k->buffer == iov->iov_base && k->head == iov->iov_len && k->tail) {
		memcpy(whole + iov->iov_len, k->tail, size - iov->iov_len);
	} else {
		uint64_t bv;
		memset(whole + iov->iov_len, 0, size - iov->iov_len);
		memcpy(&bv, whole + XSTATE_BV_OFFSET, sizeof(bv));
		bv &= XFEATURES_IN_HEAD;
		memcpy(whole + XSTATE_BV_OFFSET, &bv, sizeof(bv));
	}
	struct iovec all = {whole, size};
	return fn(REQ_SETREGSET, pid, (void *)NOTE_X86_XSTATE, &all);
}

long ptrace(int request, ...)
{
	va_list ap;
	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);
	ptrace_fn fn = real_ptrace();
	if ((uintptr_t)addr == NOTE_X86_XSTATE && data != NULL) {
		if (request == REQ_GETREGSET)
			return get_xstate(fn, pid, data);
		if (request == REQ_SETREGSET)
			return set_xstate(fn, pid, data);
	}
	return fn(request, pid, addr, data);
}
