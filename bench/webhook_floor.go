// The machine's floor for bench/webhook.py: a bare Go HTTPS server (net/http, crypto/tls) that only
// parses the AdmissionReview's uid and answers a fixed patch, driven by the same load as the
// webhook. What this machine's cores, kernel and load generator allow any webhook at all.
//
//	go build -o floor bench/webhook_floor.go && ./floor 127.0.0.1:8443 tls.crt tls.key
package main

import (
	"encoding/json"
	"io"
	"log"
	"net/http"
	"os"
)

const patch = "W3sib3AiOiJyZXBsYWNlIiwicGF0aCI6Ii9zcGVjL2NvbnRhaW5lcnMvMC9pbWFnZSIsInZhbHVlIjoieCJ9XQ==" // one replace op

type review struct {
	Request struct {
		UID string `json:"uid"`
	} `json:"request"`
}

func mutate(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	var in review
	if err == nil {
		err = json.Unmarshal(body, &in)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	out, _ := json.Marshal(map[string]any{
		"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
		"response": map[string]any{"uid": in.Request.UID, "allowed": true, "patchType": "JSONPatch", "patch": patch},
	})
	w.Header().Set("Content-Type", "application/json")
	w.Write(out)
}

func main() {
	if len(os.Args) != 4 {
		log.Fatal("usage: floor HOST:PORT CERT KEY")
	}
	http.HandleFunc("/mutate", mutate)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok")) })
	log.Fatal(http.ListenAndServeTLS(os.Args[1], os.Args[2], os.Args[3], nil))
}
