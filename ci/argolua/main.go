// Command argolua runs an Argo CD resource health check (Lua) on one object as Argo CD v3 does in
// util/lua (VM.ExecuteHealthLua): gopher-lua without the standard libraries except package, base and
// table, a 1 s deadline, the object (JSON on stdin) decoded into the global `obj`, and the returned
// table read as {status, message}; a status Argo CD does not know becomes Unknown. (Argo CD also
// loads a restricted `os` library; these checks do not use it.) Argo CD's own module needs Go 1.27.
//
//	argolua health.lua < object.json
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

// revision is set by ci/toolchain to a hash of this file, so an edit rebuilds the binary.
var revision = "dev"

var known = map[string]bool{"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintf(os.Stderr, "usage: argolua SCRIPT.lua < OBJECT.json (build %s)\n", revision)
		os.Exit(2)
	}
	out, err := run(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "argolua:", err)
		os.Exit(1)
	}
	fmt.Println(out)
}

func run(path string) (string, error) {
	script, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var obj any
	if err := json.NewDecoder(os.Stdin).Decode(&obj); err != nil {
		return "", fmt.Errorf("object: %w", err)
	}
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return "", err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("obj", decode(L, obj))
	fn, err := L.LoadString(string(script))
	if err != nil {
		return "", err
	}
	L.Push(fn)
	if err := L.PCall(0, lua.MultRet, nil); err != nil {
		return "", err
	}
	ret, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return "", fmt.Errorf("%s returned %s, not a table", path, L.Get(-1).Type())
	}
	status, message := lua.LVAsString(ret.RawGetString("status")), lua.LVAsString(ret.RawGetString("message"))
	if !known[status] {
		status, message = "Unknown", "Lua returned an invalid health status"
	}
	b, err := json.Marshal(map[string]string{"status": status, "message": message})
	return string(b), err
}

// decode is Argo CD's decodeValue: objects and arrays become tables (arrays 1-based).
func decode(L *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case map[string]any:
		t := L.CreateTable(0, len(v))
		for k, e := range v {
			t.RawSetH(lua.LString(k), decode(L, e))
		}
		return t
	case []any:
		t := L.CreateTable(len(v), 0)
		for _, e := range v {
			t.Append(decode(L, e))
		}
		return t
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}
