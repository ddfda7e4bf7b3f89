//! The table-growth bomb: a component of the `wasmesh:plugin` world whose
//! `on-request` grows a funcref table without end. Hand-assembled, because
//! no Rust guest can emit `table.grow`.

use std::path::Path;

use wasm_encoder::{
    CodeSection, ConstExpr, ExportKind, ExportSection, Function, FunctionSection, GlobalSection,
    GlobalType, Instruction as I, MemorySection, MemoryType, Module, RefType, TableSection,
    TableType, TypeSection, ValType,
};

/// Write the component to `out`, built against the WIT in `wit_dir`.
pub fn write(wit_dir: &Path, out: &Path) {
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve.push_path(wit_dir).expect("parsing wit/");
    let version = resolve.packages[pkg]
        .name
        .version
        .as_ref()
        .expect("wit/ names its version")
        .to_string();
    let mut module = core_module(&version);
    let world = resolve
        .select_world(&[pkg], Some("plugin"))
        .expect("the plugin world");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("embedding the component type");
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("the table bomb's core module")
        .validate(true)
        .encode()
        .expect("encoding the table bomb component");
    std::fs::write(out, component).unwrap();
}

/// The core module, exporting the `filter` interface of `version`.
fn core_module(version: &str) -> Vec<u8> {
    let i32_ = ValType::I32;
    let mut types = TypeSection::new();
    // 0: cabi_realloc(old, old_size, align, new_size) -> ptr
    types.ty().function([i32_; 4], [i32_]);
    // 1: hooks() -> flags
    types.ty().function([], [i32_]);
    // 2: configure(ptr, len) -> retptr
    types.ty().function([i32_; 2], [i32_]);
    // 3: on-request(req) -> retptr
    types.ty().function([i32_], [i32_]);
    // 4: on-response(req, resp, attempt...) -> retptr
    let mut on_response = vec![i32_; 13];
    on_response.push(ValType::I64);
    types.ty().function(on_response, [i32_]);
    // 5: on-complete(req, status?, status, attempts, duration-us)
    types
        .ty()
        .function([i32_, i32_, i32_, i32_, ValType::I64], []);

    let mut funcs = FunctionSection::new();
    for ty in [0, 1, 2, 3, 4, 5] {
        funcs.function(ty);
    }
    let mut tables = TableSection::new();
    tables.table(TableType {
        element_type: RefType::FUNCREF,
        table64: false,
        minimum: 1,
        maximum: None,
        shared: false,
    });
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut globals = GlobalSection::new();
    // The bump allocator's next free byte.
    globals.global(
        GlobalType {
            val_type: i32_,
            mutable: true,
            shared: false,
        },
        &ConstExpr::i32_const(4096),
    );
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    exports.export("cabi_realloc", ExportKind::Func, 0);
    for (i, name) in [
        "hooks",
        "configure",
        "on-request",
        "on-response",
        "on-complete",
    ]
    .iter()
    .enumerate()
    {
        exports.export(
            &format!("wasmesh:plugin/filter@{version}#{name}"),
            ExportKind::Func,
            i as u32 + 1,
        );
    }

    let mut code = CodeSection::new();
    // cabi_realloc: bump by new_size, 8-aligned; grow memory as needed.
    let mut f = Function::new([]);
    f.instruction(&I::GlobalGet(0));
    f.instruction(&I::GlobalGet(0));
    f.instruction(&I::LocalGet(3));
    f.instruction(&I::I32Add);
    f.instruction(&I::I32Const(7));
    f.instruction(&I::I32Add);
    f.instruction(&I::I32Const(-8));
    f.instruction(&I::I32And);
    f.instruction(&I::GlobalSet(0));
    // memory.grow(1) while heap > size * 64Ki
    f.instruction(&I::Block(wasm_encoder::BlockType::Empty));
    f.instruction(&I::Loop(wasm_encoder::BlockType::Empty));
    f.instruction(&I::GlobalGet(0));
    f.instruction(&I::MemorySize(0));
    f.instruction(&I::I32Const(16));
    f.instruction(&I::I32Shl);
    f.instruction(&I::I32LeU);
    f.instruction(&I::BrIf(1));
    f.instruction(&I::I32Const(1));
    f.instruction(&I::MemoryGrow(0));
    f.instruction(&I::Drop);
    f.instruction(&I::Br(0));
    f.instruction(&I::End);
    f.instruction(&I::End);
    f.instruction(&I::End);
    code.function(&f);
    // hooks: on-request only.
    let mut f = Function::new([]);
    f.instruction(&I::I32Const(1));
    f.instruction(&I::End);
    code.function(&f);
    // configure: ok (a zeroed return area at 1024).
    let mut f = Function::new([]);
    f.instruction(&I::I32Const(1024));
    f.instruction(&I::End);
    code.function(&f);
    // on-request: grow the table by 10,000 elements, forever.
    let mut f = Function::new([]);
    f.instruction(&I::Loop(wasm_encoder::BlockType::Empty));
    f.instruction(&I::RefNull(wasm_encoder::HeapType::FUNC));
    f.instruction(&I::I32Const(10_000));
    f.instruction(&I::TableGrow(0));
    f.instruction(&I::Drop);
    f.instruction(&I::Br(0));
    f.instruction(&I::End);
    f.instruction(&I::Unreachable);
    f.instruction(&I::End);
    code.function(&f);
    // on-response, on-complete: never called (not declared in hooks).
    for _ in 0..2 {
        let mut f = Function::new([]);
        f.instruction(&I::Unreachable);
        f.instruction(&I::End);
        code.function(&f);
    }

    let mut m = Module::new();
    m.section(&types)
        .section(&funcs)
        .section(&tables)
        .section(&memories)
        .section(&globals)
        .section(&exports)
        .section(&code);
    m.finish()
}
