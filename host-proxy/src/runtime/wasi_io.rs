//! `wasi:io/poll` and `wasi:io/streams` for plugins, without blocking.
//!
//! wasmtime-wasi's synchronous bindings drive WASI I/O by entering the tokio
//! runtime with `block_on`, which panics on a tokio worker — where hook calls
//! run. Plugins only ever write to stdout/stderr (routed to the log, always
//! ready), so these bindings poll each operation once: a ready operation
//! completes; one that would wait (a guest sleeping, or reading stdin) traps,
//! because a plugin may not block a proxy worker.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::{DynPollable, StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    HostInputStream as AsyncIn, HostOutputStream as AsyncOut,
};

type OutputStream = streams::OutputStream;
type InputStream = streams::InputStream;

/// The resource table, seen through non-blocking I/O bindings.
pub struct NoBlockIo<'a>(&'a mut ResourceTable);

struct NoBlock;

impl HasData for NoBlock {
    type Data<'a> = NoBlockIo<'a>;
}

/// Replace wasmtime-wasi's blocking `wasi:io/poll` and `wasi:io/streams`
/// with these.
pub fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    poll::add_to_linker::<T, NoBlock>(linker, |t| NoBlockIo(t.ctx().table))?;
    streams::add_to_linker::<T, NoBlock>(linker, |t| NoBlockIo(t.ctx().table))?;
    linker.allow_shadowing(false);
    Ok(())
}

const WOULD_BLOCK: &str =
    "the plugin blocked on I/O (a sleep, a read, a full stream); plugins may not block the proxy";

fn once<F: Future>(f: F) -> wasmtime::Result<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Ok(v),
        Poll::Pending => Err(wasmtime::format_err!(WOULD_BLOCK)),
    }
}

fn once_stream<T, F: Future<Output = StreamResult<T>>>(f: F) -> StreamResult<T> {
    once(f).map_err(StreamError::Trap)?
}

impl poll::Host for NoBlockIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        once(async_poll::Host::poll(self.0, pollables))?
    }
}

impl poll::HostPollable for NoBlockIo<'_> {
    fn ready(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<bool> {
        once(async_poll::HostPollable::ready(self.0, p))?
    }
    fn block(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
        once(async_poll::HostPollable::block(self.0, p))?
    }
    fn drop(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, p)
    }
}

impl streams::Host for NoBlockIo<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostOutputStream for NoBlockIo<'_> {
    fn drop(&mut self, s: Resource<OutputStream>) -> wasmtime::Result<()> {
        once(AsyncOut::drop(self.0, s))?
    }
    fn check_write(&mut self, s: Resource<OutputStream>) -> StreamResult<u64> {
        AsyncOut::check_write(self.0, s)
    }
    fn write(&mut self, s: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        AsyncOut::write(self.0, s, bytes)
    }
    fn blocking_write_and_flush(
        &mut self,
        s: Resource<OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        once_stream(AsyncOut::blocking_write_and_flush(self.0, s, bytes))
    }
    fn blocking_write_zeroes_and_flush(
        &mut self,
        s: Resource<OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        once_stream(AsyncOut::blocking_write_zeroes_and_flush(self.0, s, len))
    }
    fn subscribe(&mut self, s: Resource<OutputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncOut::subscribe(self.0, s)
    }
    fn write_zeroes(&mut self, s: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        AsyncOut::write_zeroes(self.0, s, len)
    }
    fn flush(&mut self, s: Resource<OutputStream>) -> StreamResult<()> {
        AsyncOut::flush(self.0, s)
    }
    fn blocking_flush(&mut self, s: Resource<OutputStream>) -> StreamResult<()> {
        once_stream(AsyncOut::blocking_flush(self.0, s))
    }
    fn splice(
        &mut self,
        d: Resource<OutputStream>,
        s: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        AsyncOut::splice(self.0, d, s, len)
    }
    fn blocking_splice(
        &mut self,
        d: Resource<OutputStream>,
        s: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        once_stream(AsyncOut::blocking_splice(self.0, d, s, len))
    }
}

impl streams::HostInputStream for NoBlockIo<'_> {
    fn drop(&mut self, s: Resource<InputStream>) -> wasmtime::Result<()> {
        once(AsyncIn::drop(self.0, s))?
    }
    fn read(&mut self, s: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncIn::read(self.0, s, len)
    }
    fn blocking_read(&mut self, s: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        once_stream(AsyncIn::blocking_read(self.0, s, len))
    }
    fn skip(&mut self, s: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        AsyncIn::skip(self.0, s, len)
    }
    fn blocking_skip(&mut self, s: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        once_stream(AsyncIn::blocking_skip(self.0, s, len))
    }
    fn subscribe(&mut self, s: Resource<InputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncIn::subscribe(self.0, s)
    }
}
