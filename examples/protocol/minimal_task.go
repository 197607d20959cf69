// minimal_task.go: minimal_task.c in Go, with the standard library only (docs/protocol.md,
// "Writing a task in C++ or Go"). It does no work: hello, an answer to every order, exit 0
// after EXIT, at EOF or on SIGTERM.
// Build: go build -o minimal_task minimal_task.go
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
)

// transition -> {state it is valid in -> state after it}
var next = map[string]map[string]string{
	"CONFIGURE": {"STANDBY": "CONFIGURED"}, "START": {"CONFIGURED": "RUNNING"},
	"STOP": {"RUNNING": "CONFIGURED"}, "RESET": {"CONFIGURED": "STANDBY"},
	"EXIT": {"STANDBY": "DONE", "CONFIGURED": "DONE"},
}

type order struct {
	ID         int64             `json:"id"`
	Transition string            `json:"transition"`
	Args       map[string]string `json:"args"`
}

func main() {
	fd, err := strconv.Atoi(os.Getenv("CORRAL_CONTROL_FD"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "CORRAL_CONTROL_FD is not set: start me from corral")
		os.Exit(2)
	}
	syscall.CloseOnExec(fd)
	ctl := os.NewFile(uintptr(fd), "control")
	out := json.NewEncoder(ctl) // Encode writes compact JSON and "\n", in one write
	// SIGTERM: end cleanly
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		<-sig
		os.Exit(0)
	}()
	state := "STANDBY"
	out.Encode(map[string]any{"state": state, "pid": os.Getpid(), "protocol": 1})
	in := bufio.NewScanner(ctl)
	in.Buffer(make([]byte, 64<<10), 1<<20+1) // lines of up to 1 MiB
	// Scan is false at EOF: the controller is gone
	for in.Scan() {
		var o order
		if json.Unmarshal(in.Bytes(), &o) != nil {
			continue // an empty line (the controller sends no bad JSON)
		}
		to, ok := next[o.Transition][state]
		switch {
		case next[o.Transition] == nil:
			out.Encode(map[string]any{"id": o.ID, "error": "unknown transition " + o.Transition})
		case !ok:
			out.Encode(map[string]any{"id": o.ID, "error": "cannot " + o.Transition + " in state " + state})
		default:
			// the transition's work goes here: o.Args["chans.NAME.address"], o.Args["run_number"], ...
			state = to
			out.Encode(map[string]any{"id": o.ID, "state": state})
		}
		if state == "DONE" {
			return
		}
	}
}
